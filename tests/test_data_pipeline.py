"""load_pairs: file types, schemas, templates, exact token ids, length policy, bad rows and the on-disk cache."""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
from collections import Counter

import pytest
from conftest import shared_path

from mdpo.config import DataConfig, load_config
from mdpo.data.formats import RowError, hh_messages
from mdpo.data.pairs import TokenizeReport, load_pairs
from mdpo.data.trees import trees_length
from mdpo.errors import ConfigError, DataError

EOS = 2
NL = 13  # "\n" is a byte piece in Llama 2: it never merges with its neighbours
USER = [29966, 29989, 1792, 29989, 29958]  # "<|user|>" after a newline
ASSISTANT = [29966, 29989, 465, 22137, 29989, 29958]  # "<|assistant|>" after a newline

UF_ROW = {
    "prompt": "What is 2+2?",
    "chosen": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "Four."}],
    "rejected": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "Five."}],
    "score_chosen": 8.0,
    "score_rejected": 2.0,
}


@pytest.fixture(scope="module")
def tok():
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    return AutoTokenizer.from_pretrained(str(shared_path("tokenizers", "llama2")))


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def load(path, tok, **fields):
    """load_pairs with caching off unless asked; returns (pairs, report)."""
    report = TokenizeReport()
    fields.setdefault("cache", False)
    pairs = load_pairs(DataConfig(**fields), str(path), tok, report)
    return pairs, report


def uf(chosen="Four.", rejected="Five.", **changes):
    row = json.loads(json.dumps(UF_ROW))
    row["chosen"][-1]["content"], row["rejected"][-1]["content"] = chosen, rejected
    row.update(changes)
    return row


# --------------------------------------------------------------------------- exact ids


def test_tulu2_pair_has_the_exact_ids_of_the_tulu2_text(tmp_path, tok):
    turns = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ]
    row = {
        "chosen": [*turns, {"role": "assistant", "content": "Six."}],
        "rejected": [*turns, {"role": "assistant", "content": "Seven."}],
    }
    (pair,), report = load(write_jsonl(tmp_path / "d.jsonl", [row]), tok, template="tulu2")
    # "<|system|>\nBe brief.\n<|user|>\nWhat is 2+2?\n<|assistant|>\n4</s>\n<|user|>\nAnd 3+3?\n<|assistant|>\n"
    system = [529, 29989, 5205, 29989, 29958]  # "<|system|>" opening the text: "▁<" (no BOS: this tokenizer adds none)
    expected_prompt = (
        [*system, NL, 3629, 11473, 29889, NL]  # Be brief.
        + [*USER, NL, 5618, 338, 29871, 29906, 29974, 29906, 29973, NL]  # What is 2+2?
        + [*ASSISTANT, NL, 29946, EOS, 29871, NL]  # 4</s> then "\n", which starts a new piece after </s>
        + [*USER, NL, 2855, 29871, 29941, 29974, 29941, 29973, NL]  # And 3+3?
        + [*ASSISTANT, NL]  # the generation prompt
    )
    assert pair.prompt == expected_prompt
    assert pair.chosen == [29903, 861, 29889, EOS]  # "Six." + EOS, tokenized as a continuation of the prompt
    assert pair.rejected == [2008, 854, 29889, EOS]  # "Seven." + EOS
    assert report.counts == {} and report.info["template"] == "tulu2" and report.info["format"] == "ultrafeedback"


def test_a_merge_across_the_boundary_is_fixed_and_counted(tmp_path, tok):
    # raw: "Hello wor" + "ld peace" tokenizes as "▁world", so the prompt's "▁wor" is not a prefix of the joint ids
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Hello wor", "chosen": "ld peace", "rejected": "\nBye"}])
    (pair,), report = load(path, tok)
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]
    assert pair.prompt == enc("Hello wor")
    assert pair.chosen == [*tok.convert_tokens_to_ids(["ld", "▁peace"]), EOS]  # no word-start "▁" invented
    assert pair.rejected == enc("Hello wor\nBye")[len(pair.prompt) :] + [EOS]  # no merge: the joint ids
    assert tok.decode(pair.prompt + pair.chosen[:-1]) == "Hello world peace"
    assert report.counts == {"boundary re-tokenized": 1}


def test_ultrafeedback_sample_ids_equal_the_whole_tulu2_text(tok):
    path = shared_path("data", "ultrafeedback_binarized_sample_200.jsonl")
    pairs, report = load(path, tok, template="tulu2")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(pairs) == len(rows) == 200 and report.counts == {}
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]
    for pair, row in zip(pairs, rows):
        prompt = f"<|user|>\n{row['prompt'].strip()}\n<|assistant|>\n"
        assert pair.prompt == enc(prompt)
        for ids, messages in ((pair.chosen, row["chosen"]), (pair.rejected, row["rejected"])):
            assert pair.prompt + ids == enc(prompt + messages[-1]["content"].strip()) + [EOS]


def test_hh_sample_raw_by_default_and_tulu2_on_request(tok):
    path = shared_path("data", "hh_helpful_base_test_500.jsonl")
    with pytest.raises(DataError, match=r"hh_helpful_base_test_500.jsonl:\d+: 'rejected' is empty"):
        load(path, tok)
    pairs, report = load(path, tok, on_bad_row="skip")
    assert (report.info["format"], report.info["template"], report.info["rows"]) == ("hh", "raw", 500)
    assert len(pairs) == 499 and report.counts == {"skipped: 'rejected' is empty": 1}
    assert all(tok.decode(p.prompt).endswith("\n\nAssistant:") for p in pairs)
    templated, _ = load(path, tok, on_bad_row="skip", template="tulu2")
    assert tok.decode(templated[0].prompt).startswith("<|user|>\nDo you know why turkeys")
    assert [p.index for p in templated] == [p.index for p in pairs]


def test_hh_transcript_becomes_messages():
    prompt = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant:"
    assert hh_messages(prompt) == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "how?"},
    ]
    with pytest.raises(RowError, match="does not start"):
        hh_messages("Hi\n\nAssistant:")


# --------------------------------------------------------------------------- schemas and templates


def test_conversational_prompt_with_string_or_message_completions(tmp_path, tok):
    prompt = [{"role": "user", "content": "Hi"}]
    rows = [
        {"prompt": prompt, "chosen": "Hello!", "rejected": "Go away."},
        {"prompt": prompt, "chosen": [{"role": "assistant", "content": "Hello!"}], "rejected": "Go away."},
    ]
    pairs, report = load(write_jsonl(tmp_path / "d.jsonl", rows), tok)
    assert report.info["format"] == "conversational" and report.info["template"] == "tulu2"
    assert pairs[0].prompt == pairs[1].prompt and pairs[0].chosen == pairs[1].chosen
    assert tok.decode(pairs[0].prompt + pairs[0].chosen) == "<|user|>\nHi\n<|assistant|>\nHello!</s>"


def test_column_names_are_mapped_from_the_config(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"q": "1+1=", "good": "2", "bad": "3"}])
    (pair,), _ = load(path, tok, prompt_key="q", chosen_key="good", rejected_key="bad")
    assert tok.decode(pair.chosen) == "2</s>"


CHAT = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ '\\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{{ '\\n' }}{% endif %}"
)


def test_jinja_and_tokenizer_templates_own_special_tokens_and_eos_comes_once(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [uf()])
    with pytest.raises(DataError, match="has no chat_template"):
        load(path, tok, template="tokenizer")
    (pair,), report = load(path, tok, template=CHAT)
    assert tok.decode(pair.prompt) == "<s> [user]\nWhat is 2+2?\n[assistant]\n"  # " ": "▁" opens text after <s>
    assert report.counts == {}
    assert pair.prompt[0] == tok.bos_token_id and pair.prompt.count(tok.bos_token_id) == 1
    assert pair.chosen.count(EOS) == 1 and pair.chosen[-1] == EOS  # the template's "</s>\n" is not kept twice
    tok.chat_template = CHAT
    try:
        (same,), report = load(path, tok)  # auto: the tokenizer's own template for message rows
    finally:
        tok.chat_template = None
    assert same == pair and report.info["template"] == "tokenizer"


def test_raw_template_refuses_message_rows(tmp_path, tok):
    with pytest.raises(DataError, match="template=raw needs text prompts"):
        load(write_jsonl(tmp_path / "d.jsonl", [uf()]), tok, template="raw")


# --------------------------------------------------------------------------- file types


def test_every_file_type_gives_the_same_pairs(tmp_path, tok):
    import datasets

    rows = [uf(), uf("Four!", "Six."), uf("4", "22")]
    base, _ = load(write_jsonl(tmp_path / "d.jsonl", rows), tok)
    (tmp_path / "array.json").write_text(json.dumps(rows))
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in rows))
    table = datasets.Dataset.from_list(rows)
    table.to_parquet(str(tmp_path / "d.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": table}).save_to_disk(str(tmp_path / "saved_dict"))
    shutil.copy(next((tmp_path / "saved").glob("*.arrow")), tmp_path / "d.arrow")
    shards = tmp_path / "shards"
    shards.mkdir()
    write_jsonl(shards / "part-0.jsonl", rows[:2])
    table.select([2]).to_parquet(str(shards / "part-1.parquet"))
    for name in ("array.json", "d.jsonl.gz", "d.parquet", "saved", "saved_dict", "d.arrow", "shards"):
        pairs, report = load(tmp_path / name, tok)
        assert pairs == base, name
        assert report.info["rows"] == 3


def test_a_bad_row_in_a_shard_names_that_shard_and_its_row(tmp_path, tok):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_jsonl(shards / "a.jsonl", [uf(), uf()])
    write_jsonl(shards / "b.jsonl", [uf(), "", uf(), "{oops"])
    with pytest.raises(DataError, match=rf"{shards / 'b.jsonl'}:4: malformed JSON"):
        load(shards, tok)
    pairs, report = load(shards, tok, on_bad_row="skip")
    assert [p.index for p in pairs] == [0, 1, 2, 3]  # blank lines are not rows; the bad row keeps index 4
    assert report.counts == {"skipped: malformed JSON (Expecting property name enclosed in double quotes)": 1}


@pytest.mark.parametrize("name", ["missing.jsonl", "notes.txt", "empty_dir"])
def test_unreadable_paths(tmp_path, tok, name):
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="not found|unsupported data file|no data files"):
        load(tmp_path / name, tok)


# --------------------------------------------------------------------------- bad rows

BAD_ROWS = {
    "malformed JSON": "{not json",
    "missing column 'rejected'": {k: v for k, v in uf().items() if k != "rejected"},
    "'chosen' is empty": uf(chosen="   "),
    "chosen and rejected are identical": uf(rejected="Four."),
    "'rejected'[1]: content must be a string, got int": uf(rejected=4),
    "'chosen'[0]: role 'robot' is not system, user, assistant or tool": {
        **uf(),
        "chosen": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}],
    },
    "prompt does not match between chosen and rejected": {
        **uf(),
        "rejected": [{"role": "user", "content": "What is 3+3?"}, {"role": "assistant", "content": "Five."}],
    },
    "'chosen' must end with an assistant message": {**uf(), "chosen": [{"role": "user", "content": "Hi"}]},
    "expected a JSON object": "[1, 2]",
}


@pytest.mark.parametrize("reason", list(BAD_ROWS))
def test_bad_row_is_an_error_naming_file_and_row(tmp_path, tok, reason):
    path = write_jsonl(tmp_path / "d.jsonl", [uf(), BAD_ROWS[reason], uf()])
    with pytest.raises(DataError) as err:
        load(path, tok)
    assert f"{path}:2: {reason}" in str(err.value)


def test_bad_rows_are_skipped_and_counted_when_asked(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [uf(), *BAD_ROWS.values(), uf()])
    pairs, report = load(path, tok, on_bad_row="skip")
    assert [p.index for p in pairs] == [0, len(BAD_ROWS) + 1]
    assert sum(report.counts.values()) == len(BAD_ROWS)
    assert all(reason.startswith("skipped: ") for reason in report.counts)


RANKED = {"prompt": "2+2?", "completions": ["4", "5"], "scores": [2, 1]}
NECTAR = {
    "prompt": "\n\nHuman: 2+2?\n\nAssistant: ",
    "answers": [{"answer": "4", "rank": 1}, {"answer": "5", "rank": 2}],
}
UF_RAW = {
    "instruction": "2+2?",
    "completions": [{"response": "4", "overall_score": 2}, {"response": "5", "overall_score": 1}],
}
TURNS = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "rejected": "Bye"}]}
NO_TOOLS = CHAT.replace(
    "{% for m in messages %}",
    "{% for m in messages %}{% if m['role'] == 'tool' %}"
    "{{ raise_exception('this template has no tool role') }}{% endif %}",
)
# a bad row of each expanded format: (a good row of its format, the bad row, settings) by the reason named
BAD_EXPANDED_ROWS = {
    "'scores' has 3 values for 2 completions": (RANKED, {**RANKED, "scores": [3, 2, 1]}, {}),
    "'ranks': rank 1 is repeated (ranks must be 1..2, each once)": (
        RANKED,
        {"prompt": "2+2?", "completions": ["4", "5"], "ranks": [1, 1]},
        {},
    ),
    "'answers': rank 2 is missing (ranks must be 1..2, each once)": (
        NECTAR,
        {**NECTAR, "answers": [{"answer": "4", "rank": 1}, {"answer": "5", "rank": 3}]},
        {},
    ),
    "'answers'[1].rank is missing": (NECTAR, {**NECTAR, "answers": [{"answer": "4", "rank": 1}, {"answer": "5"}]}, {}),
    "'completions'[1].overall_score must be a number, got 'N/A'": (
        UF_RAW,
        {**UF_RAW, "completions": [UF_RAW["completions"][0], {"response": "5", "overall_score": "N/A"}]},
        {},
    ),
    "no pair left: the best score is shared by 2 completions": (
        UF_RAW,
        {**UF_RAW, "completions": [{"response": r, "overall_score": n} for r, n in (("4", 2), ("Four", 2), ("5", 1))]},
        {"rank_pairs": "best_vs_rest"},
    ),
    "'messages'[0]: 'rejected' on a user message (only assistant turns have one)": (
        TURNS,
        {"messages": [{"role": "user", "content": "Hi", "rejected": "Yo"}, TURNS["messages"][1]]},
        {},
    ),
    "chat template: this template has no tool role": (
        TURNS,
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "tool", "content": "4"}, TURNS["messages"][1]]},
        {"template": NO_TOOLS},
    ),
    "template tulu2 cannot render a tool message": (
        TURNS,
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "tool", "content": "4"}, TURNS["messages"][1]]},
        {"template": "tulu2"},
    ),
}


@pytest.mark.parametrize("reason", list(BAD_EXPANDED_ROWS))
def test_bad_ranked_or_turn_row_is_one_line_naming_file_row_and_key(tmp_path, tok, reason):
    good, bad, settings = BAD_EXPANDED_ROWS[reason]
    path = write_jsonl(tmp_path / "d.jsonl", [good, bad, good])
    with pytest.raises(DataError) as err:
        load(path, tok, **settings)
    assert f"{path}:2: {reason}" in str(err.value) and "\n" not in str(err.value)
    pairs, report = load(path, tok, on_bad_row="skip", **settings)
    assert [p.row for p in pairs] == [0, 2]
    kind = "dropped" if reason.startswith("no pair left") else "skipped"  # a row the rule leaves without a pair
    ((counted, n),) = report.counts.items()
    assert counted.startswith(f"{kind}: {reason}") and n == 1


def test_plain_rows_with_wrong_types_and_no_usable_rows(tmp_path, tok):
    good = {"prompt": "1+1=", "chosen": "2", "rejected": "3"}
    path = write_jsonl(tmp_path / "d.jsonl", [good, {**good, "chosen": 3}])
    with pytest.raises(DataError, match=r"d.jsonl:2: 'chosen' must be a string, got int"):
        load(path, tok)
    path = write_jsonl(tmp_path / "e.jsonl", [{**good, "rejected": "2"}])
    with pytest.raises(DataError, match="no usable pairs"):
        load(path, tok, on_bad_row="skip")


# --------------------------------------------------------------------------- lengths


def test_length_policy_truncates_and_drops_with_counts(tmp_path, tok):
    rows = [
        {"prompt": "one two three four five six seven eight", "chosen": " yes", "rejected": " no"},
        {"prompt": "Hi", "chosen": " x" * 40, "rejected": " y"},
        {"prompt": "word " * 50, "chosen": " a", "rejected": " b"},
        {"prompt": "Hi", "chosen": " yes", "rejected": " no"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]
    pairs, report = load(path, tok, max_length=24, max_prompt_length=4)
    assert [p.index for p in pairs] == [0, 1, 2, 3]
    assert pairs[0].prompt == enc(rows[0]["prompt"])[-4:]  # keep_end
    assert len(pairs[1].prompt) + len(pairs[1].chosen) == 24 and pairs[1].chosen[-1] != EOS
    assert report.counts == {"truncated: prompt > max_prompt_length": 2, "truncated: chosen response": 1}
    pairs, _ = load(path, tok, max_length=24, max_prompt_length=4, prompt_truncation="keep_start")
    assert pairs[0].prompt == enc(rows[0]["prompt"])[:4]
    pairs, report = load(path, tok, max_length=24, max_prompt_length=4, over_length="drop")
    assert [p.index for p in pairs] == [3]
    assert report.counts == {"dropped: prompt > max_prompt_length": 2, "dropped: over max_length": 1}
    pairs, report = load(path, tok, max_length=24)
    assert [p.index for p in pairs] == [0, 1, 3]
    assert report.counts == {"dropped: prompt >= max_length": 1, "truncated: chosen response": 1}
    pairs, report = load(path, tok, max_length=24, over_length="drop")
    assert [p.index for p in pairs] == [0, 3]
    assert report.counts == {"dropped: prompt >= max_length": 1, "dropped: over max_length": 1}


# --------------------------------------------------------------------------- cache and processes


def test_cache_is_reused_and_invalidated_by_file_and_settings(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [uf(), uf("Four!", "Six.")])
    cache = str(tmp_path / "cache")
    first, report = load(path, tok, cache=True, cache_dir=cache)
    assert report.info["cache"] == "written"
    again, report = load(path, tok, cache=True, cache_dir=cache)
    assert report.info["cache"] == "hit" and again == first
    _, report = load(path, tok, cache=True, cache_dir=cache, max_length=100)
    assert report.info["cache"] == "written"
    write_jsonl(path, [uf(), uf("Four!", "Seven.")])
    os.utime(path, ns=(1, 1))  # same size, different mtime
    changed, report = load(path, tok, cache=True, cache_dir=cache)
    assert report.info["cache"] == "written" and changed[1].rejected != first[1].rejected
    assert len(os.listdir(cache)) == 3  # three keys, no temporary folders left


def test_bad_rows_are_reported_from_the_cache_too(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [uf(), "{bad", uf()])
    cache = str(tmp_path / "cache")
    for status in ("written", "hit"):
        pairs, report = load(path, tok, cache=True, cache_dir=cache, on_bad_row="skip")
        assert report.info["cache"] == status and len(pairs) == 2 and sum(report.counts.values()) == 1
        with pytest.raises(DataError, match="d.jsonl:2: malformed JSON"):
            load(path, tok, cache=True, cache_dir=cache)


def test_several_processes_give_the_same_pairs(tok):
    path = shared_path("data", "ultrafeedback_binarized_sample_200.jsonl")
    one, _ = load(path, tok, template="tulu2", max_length=512)
    two, report = load(path, tok, template="tulu2", max_length=512, num_proc=2)
    assert two == one and sum(report.counts.values()) > 0


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.format=yaml", "data.format must be one of"),
        ("data.template=chatml", "data.template must be auto, tulu2, tulu3, tokenizer, raw or a Jinja"),
        ("data.prompt_truncation=middle", "data.prompt_truncation must be"),
        ("data.over_length=wrap", "data.over_length must be"),
        ("data.num_proc=0", "data.num_proc must be >= 1"),
        ("data.max_prompt_length=9000", "data.max_prompt_length must be in"),
        ("data.rank_pairs=best", "data.rank_pairs must be all_pairs, best_vs_worst, best_vs_rest, best_vs_random or r"),
        (["data.rank_pairs=ranking", "data.min_score_gap=1"], "data.min_score_gap=1 drops pairs, and data.rank_pa"),
        ("data.min_score_gap=-1", "data.min_score_gap must be >= 0"),
        ("data.chat_template_kwargs={tokenize: true}", "data.chat_template_kwargs may not set tokenize"),
        ("data.chat_template_kwargs=[1]", "'data.chat_template_kwargs' must be dict"),
    ],
)
def test_data_config_fields_are_checked(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(
            None, ["data.train_file=x", "data.tokenizer=y", *([override] if isinstance(override, str) else override)]
        )


# --------------------------------------------------------------------------- today's tokenizers (Llama 3, Qwen 2.5)

# Tulu 3's chat template as its tokenizer_config.json publishes it (the oracle of data.template=tulu3)
TULU3_JINJA = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{% if not loop.last %}"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token + '\n' }}"
    "{% else %}{{ '<|assistant|>\n'  + message['content'] + eos_token }}{% endif %}{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}{% endfor %}"
)


@pytest.mark.parametrize("name", ["llama3", "qwen2"])
def test_chat_template_boundary_is_exact_on_ultrafeedback(name):
    """The whole UltraFeedback sample with the real Llama 3 / Qwen tokenizer and its own chat template (auto for
    message rows): prompt + response is exactly what transformers' `apply_chat_template` tokenizes for the whole
    conversation (Qwen's trailing newline after <|im_end|> aside), the prompt its generation-prompt rendering, and no
    boundary needed re-tokenizing."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(shared_path("tokenizers", name)))
    path = shared_path("data", "ultrafeedback_binarized_sample_200.jsonl")
    pairs, report = load(path, tok, max_length=1 << 16)
    assert report.info["template"] == "tokenizer" and report.counts == {} and len(pairs) == 200
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    ids = lambda messages, **kw: tok.apply_chat_template(messages, tokenize=True, return_dict=False, **kw)
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    for pair, row in zip(pairs, rows):
        prompt = row["chosen"][:-1]
        assert pair.prompt == ids(prompt, add_generation_prompt=True)
        for response, messages in ((pair.chosen, row["chosen"]), (pair.rejected, row["rejected"])):
            whole = ids([*prompt, {"role": "assistant", "content": messages[-1]["content"].strip()}])
            if name == "qwen2":
                assert whole[-len(newline) :] == newline
                whole = whole[: -len(newline)]
            assert pair.prompt + response == whole and response[-1] == tok.eos_token_id


def test_tulu3_template_is_tulu3s_own_with_bos(tmp_path):
    """data.template=tulu3 with the Llama 3 tokenizer: Tulu 3's published Jinja template rendered by transformers,
    the tokenizer's BOS first (Tulu 3 trains with --add_bos), its EOS ending each response; prompt contents kept as
    they are (a system turn with surrounding spaces shows it), unlike tulu2."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(shared_path("tokenizers", "llama3")))
    system = {"role": "system", "content": "  Be brief. "}
    row = {**UF_ROW, "chosen": [system, *UF_ROW["chosen"]], "rejected": [system, *UF_ROW["rejected"]]}
    (pair,), report = load(write_jsonl(tmp_path / "d.jsonl", [row]), tok, template="tulu3")
    assert report.counts == {} and report.info["template"] == "tulu3"
    render = lambda messages, **kw: tok.apply_chat_template(messages, chat_template=TULU3_JINJA, tokenize=False, **kw)
    enc = lambda text: [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    assert pair.prompt == enc(render(row["chosen"][:-1], add_generation_prompt=True))
    assert pair.prompt + pair.chosen == enc(render(row["chosen"]))  # ends "Four.<|eot_id|>": the tokenizer's EOS
    assert tok.decode(pair.prompt).startswith("<|begin_of_text|><|system|>\n  Be brief. \n<|user|>")
    (tulu2,), _ = load(write_jsonl(tmp_path / "e.jsonl", [row]), tok, template="tulu2")
    assert tulu2.prompt != pair.prompt  # tulu2 strips the system turn


@pytest.mark.parametrize(("name", "rows"), [("llama3", 128256), ("qwen2", 151936)])
def test_real_tokenizers_fit_their_models_vocabulary(name, rows):
    """Llama 3's 128,256 ids fit a Llama 3 model's 128,256 rows; Qwen's 151,665 ids its config's 151,936 (the rest
    is padding); Qwen's tokenizer with a Llama 3 model is refused in one line."""
    from mdpo.data.encoding import load_tokenizer
    from mdpo.training.setup import check_vocabulary

    tok = load_tokenizer(str(shared_path("tokenizers", name)))
    assert len(tok) == {"llama3": 128256, "qwen2": 151665}[name]
    check_vocabulary(tok, "tok", rows)
    if name == "qwen2":
        with pytest.raises(ConfigError, match="tokenizer tok has 151665 tokens but model.vocab_size is 128256"):
            check_vocabulary(tok, "tok", 128256)


# --------------------------------------------------------------------------- ranked, multi-turn, tools (issue 39)

# A Qwen 3 style chat template, written for these tests (no tokenizer in ../shared carries Qwen 3's): its behaviour as
# Qwen 3's template has it: tools listed in the system turn, an assistant turn after the last user message opening
# with a "<think>" block (empty without reasoning_content), tool_calls as <tool_call> JSON, tool results as a user turn
# of <tool_response>, and `enable_thinking=false` putting the empty think block into the generation prompt.
QWEN3_STYLE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0].role == 'system' %}"
    "{{- messages[0].content + '\\n\\n' }}{%- endif %}{{- '# Tools\\n<tools>' }}{%- for tool in tools %}"
    "{{- '\\n' + (tool | tojson) }}{%- endfor %}{{- '\\n</tools><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- set ns = namespace(last_user=-1) %}{%- for m in messages %}{%- if m.role == 'user' %}"
    "{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'user' or (m.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- elif m.role == 'assistant' %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if loop.index0 > ns.last_user and (loop.last or m.reasoning_content) %}"
    "{{- '<think>\\n' + (m.reasoning_content or '') + '\\n</think>\\n\\n' }}{%- endif %}{{- m.content }}"
    "{%- for call in (m.tool_calls or []) %}{{- '\\n<tool_call>\\n' + (call.function | tojson) + '\\n</tool_call>' }}"
    "{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif m.role == 'tool' %}{{- '<|im_start|>user\\n<tool_response>\\n' + m.content + '\\n</tool_response>"
    "<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

# Abstract ranked rows (prompt messages, completions, scores: higher better), written out below in each format
RANKED_CASES = [
    ([{"role": "user", "content": "What is 2+2?"}], ["4", "5", "Four.", "22"], [4, 2, 5, 2]),  # the worst shared
    ([{"role": "user", "content": "Name a color."}], ["Red", "Blue", "Green"], [3, 3, 1]),  # the best shared
    ([{"role": "user", "content": "Say hi."}], ["hi", "hello"], [2, 2]),  # every completion tied
    (
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Capital of France?"},
        ],
        ["Paris.", "Lyon.", "I don't know."],
        [5, 4.5, 1],  # a gap of 0.5
    ),
    ([{"role": "user", "content": "Best fruit?"}], ["Apple", "Banana", "Cherry", "Durian"], [1, 3, 2, 4]),
]


def _ranks(scores):
    """Ranks of distinct scores, 1 = the highest."""
    order = sorted(scores, reverse=True)
    return [order.index(s) + 1 for s in scores]


def ranked_row(fmt, case):
    """A case written as a row of `fmt` as published, or None where the format cannot hold it (one user turn for
    UltraFeedback, no ties in ranks)."""
    prompt, texts, scores = case
    single = len(prompt) == 1
    distinct = len(set(scores)) == len(scores)
    if fmt == "ultrafeedback_raw" and single:
        completions = [{"response": t, "overall_score": s, "fine-grained_score": -s} for t, s in zip(texts, scores)]
        return {"source": "test", "instruction": prompt[0]["content"], "completions": completions}
    if fmt == "nectar" and distinct:
        turns = "".join(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in prompt)
        answers = [{"answer": t, "model": "m", "rank": float(r)} for t, r in zip(texts, _ranks(scores))]
        return {"prompt": turns + "\n\nAssistant: ", "answers": answers, "turns": len(prompt)}
    if fmt == "ranked_scores":
        return {
            "prompt": prompt,
            "completions": [[{"role": "assistant", "content": t}] for t in texts],
            "scores": scores,
        }
    if fmt == "ranked_ranks" and distinct:
        return {"prompt": prompt[0]["content"] if single else prompt, "completions": texts, "ranks": _ranks(scores)}
    return None


def oracle_couples(scores, rule):
    """(chosen, rejected) completion indices as docs/data-and-templates.md describes each rule, written apart from
    mdpo.data.ranking, before min_score_gap: all_pairs in completion order, the higher chosen, ties left out; the
    others need one best (best_vs_worst also one worst); ranking needs distinct scores and pairs each completion with
    the next best."""
    n = len(scores)
    if rule == "ranking":
        ladder = sorted(range(n), key=lambda i: scores[i], reverse=True)
        return list(zip(ladder, ladder[1:])) if len(set(scores)) == n else []
    best = [i for i in range(n) if scores[i] == max(scores)]
    worst = [i for i in range(n) if scores[i] == min(scores)]
    if rule == "all_pairs":
        couples = [(i, j) if scores[i] > scores[j] else (j, i) for i in range(n) for j in range(i + 1, n)]
        couples = [(c, r) for c, r in couples if scores[c] != scores[r]]
    elif len(best) != 1:
        couples = []
    elif rule == "best_vs_worst":
        couples = [(best[0], worst[0])] if len(worst) == 1 else []
    else:  # best_vs_rest
        couples = [(best[0], j) for j in range(n) if j != best[0]]
    return couples


def conversational(prompt, chosen, rejected, tools=None):
    """An oracle pair as a plain conversational row (the existing single-pair path tokenizes it)."""
    row = {"prompt": prompt, "chosen": [chosen], "rejected": [rejected]}
    return {**row, "tools": tools} if tools else row


def as_message(response):
    return {"role": "assistant", **({"content": response} if isinstance(response, str) else response)}


def ids_of(pairs):
    return [(p.prompt, p.chosen, p.rejected) for p in pairs]


@pytest.fixture(scope="module", params=["llama3", "qwen2"])
def chat_tok(request):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(shared_path("tokenizers", request.param)))


def test_rank_rules_by_hand():
    from mdpo.data.ranking import rank_pairs

    scores = [4, 2, 5, 2]
    assert rank_pairs(scores, "all_pairs").pairs == ((0, 1), (2, 0), (0, 3), (2, 1), (2, 3))
    assert rank_pairs(scores, "all_pairs").ties == 1
    assert rank_pairs(scores, "best_vs_rest").pairs == ((2, 0), (2, 1), (2, 3))
    assert rank_pairs(scores, "best_vs_worst").no_pair == "the worst score is shared by 2 completions"
    assert rank_pairs([3, 3, 1], "best_vs_random").no_pair == "the best score is shared by 2 completions"
    assert rank_pairs([2, 2], "all_pairs").no_pair == "every completion has the same score"
    assert rank_pairs([1, 3, 2, 4], "ranking").pairs == ((3, 1), (1, 2), (2, 0))  # best first, each vs the next
    assert rank_pairs(scores, "ranking").no_pair == "tied scores: a ranking needs a strict order"
    gapped = rank_pairs([5, 4.5, 1], "all_pairs", min_score_gap=1)
    assert (gapped.pairs, gapped.below_gap) == (((0, 2), (1, 2)), 1)
    assert rank_pairs([5, 4.5], "all_pairs", min_score_gap=1).no_pair.startswith("every pair's score gap is below")
    draws = {rank_pairs(scores, "best_vs_random", rng=random.Random(seed)).pairs for seed in range(20)}
    assert draws == {((2, 0),), ((2, 1),), ((2, 3),)}  # the best against each other one, by the seed
    assert rank_pairs(scores, "best_vs_random", rng=random.Random(3)) == rank_pairs(
        scores, "best_vs_random", rng=random.Random(3)
    )


@pytest.mark.parametrize(
    ("rule", "gap"),
    [("all_pairs", 0.0), ("all_pairs", 1.0), ("best_vs_worst", 0.0), ("best_vs_rest", 0.0), ("ranking", 0.0)],
)
def test_ranked_rows_give_the_oracles_pairs(tmp_path, chat_tok, rule, gap):
    """UltraFeedback raw, Nectar and the generic form (scores, ranks) read as published: every format's pairs are the
    oracle's pairs of the same rows tokenized as plain conversational pairs, in order, rows with no pair dropped and
    counted (ties, small gaps, shared best / worst)."""
    for fmt in ("ultrafeedback_raw", "nectar", "ranked_scores", "ranked_ranks"):
        cases = [case for case in RANKED_CASES if ranked_row(fmt, case) is not None]
        rows = [ranked_row(fmt, case) for case in cases]
        pairs, report = load(
            write_jsonl(tmp_path / f"{fmt}.jsonl", rows),
            chat_tok,
            rank_pairs=rule,
            min_score_gap=gap,
            on_bad_row="skip",
        )
        assert report.info["format"] == fmt.removesuffix("_scores").removesuffix("_ranks"), fmt
        oracle_rows, rows_of_pairs, counts = [], [], Counter()
        for n, (prompt, texts, scores) in enumerate(cases):
            if fmt in ("nectar", "ranked_ranks"):
                scores = [-rank for rank in _ranks(scores)]  # ranks are the scores: min_score_gap counts ranks
            couples = oracle_couples(scores, rule)
            kept = [(c, r) for c, r in couples if scores[c] - scores[r] >= gap]
            oracle_rows += [conversational(prompt, as_message(texts[c]), as_message(texts[r])) for c, r in kept]
            rows_of_pairs += [n] * len(kept)
            if not kept:
                counts["dropped: no pair left"] += 1
                continue
            n_ties = sum(scores[i] == scores[j] for i in range(len(scores)) for j in range(i + 1, len(scores)))
            counts["tied: equal scores"] += n_ties if rule == "all_pairs" else 0
            counts["dropped: score gap < data.min_score_gap"] += len(couples) - len(kept)
        oracle, _ = load(write_jsonl(tmp_path / f"oracle-{fmt}.jsonl", oracle_rows), chat_tok)
        assert ids_of(pairs) == ids_of(oracle), fmt
        assert [p.row for p in pairs] == rows_of_pairs and all(p.turn == 0 for p in pairs), fmt
        assert report.info["rows"] == len(rows)
        found = Counter({reason: sum(v for r, v in report.counts.items() if r.startswith(reason)) for reason in counts})
        assert +found == +counts and all(reason.startswith(tuple(counts)) for reason in report.counts), fmt


def test_score_key_and_best_vs_random_seeded_per_row(tmp_path, qwen_tok):
    """data.score_key picks UltraFeedback's score; best_vs_random draws one of the non-best completions, the same for
    a row wherever it stands, from data.seed or else the training seed."""
    tok = qwen_tok
    texts = ["4", "5", "Four.", "22"]
    rows = [
        {
            "instruction": f"What is {n}?",
            "completions": [
                {"response": f"{t} ({n})", "overall_score": s, "fine-grained_score": -s}
                for t, s in zip(texts, [4, 2, 5, 1])
            ],
        }
        for n in range(12)
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    fine, _ = load(path, tok, rank_pairs="best_vs_worst", score_key="fine-grained_score")
    coarse, _ = load(path, tok, rank_pairs="best_vs_worst")
    assert [(p.chosen, p.rejected) for p in fine] == [(p.rejected, p.chosen) for p in coarse]  # scores negated
    drawn, _ = load(path, tok, rank_pairs="best_vs_random", seed=5)
    best = {p.row: p.chosen for p in coarse}
    others = {r: [f"{t} ({r}){tok.eos_token}" for t in ("4", "5", "22")] for r in range(12)}
    assert all(p.chosen == best[p.row] and tok.decode(p.rejected) in others[p.row] for p in drawn)
    assert len({tuple(p.rejected) for p in drawn}) > 1
    backwards, _ = load(write_jsonl(tmp_path / "e.jsonl", rows[::-1]), tok, rank_pairs="best_vs_random", seed=5)
    assert ids_of(backwards[::-1]) == ids_of(drawn)  # a row's draw does not depend on its position
    training_seed = load_pairs(
        DataConfig(cache=False, rank_pairs="best_vs_random"), str(path), tok, TokenizeReport(), training_seed=5
    )
    assert ids_of(training_seed) == ids_of(drawn)  # data.seed unset: the training seed
    other, _ = load(path, tok, rank_pairs="best_vs_random", seed=6)
    assert ids_of(other) != ids_of(drawn)


def turn_oracle(messages):
    """Per-turn pairs as the docs describe them, apart from mdpo's code: one per assistant message with `rejected`,
    the conversation before it (earlier assistant turns as their chosen content) as the prompt."""
    pairs, before = [], []
    for message in messages:
        chosen = {k: v for k, v in message.items() if k != "rejected"}
        if "rejected" in message:
            pairs.append((list(before), chosen, as_message(message["rejected"])))
        before.append(chosen)
    return pairs


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!", "rejected": "Go away."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6", "rejected": {"content": "7", "reasoning_content": "3+3 is 7"}},
    {"role": "user", "content": "Thanks"},
]


def test_multi_turn_rows_give_a_pair_per_rejected_turn(tmp_path, chat_tok):
    """A conversation with `rejected` at several assistant turns: each is a pair whose prompt is the conversation
    before it; a single-pair row beside it; each pair carries its row and turn."""
    single = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!", "rejected": "Bye."}]
    rows = [{"messages": CONVERSATION}, {"messages": single}]
    pairs, report = load(write_jsonl(tmp_path / "d.jsonl", rows), chat_tok)
    assert report.info["format"] == "multi_turn" and report.counts == {} and report.info["rows"] == 2
    expected = [pair for row in rows for pair in turn_oracle(row["messages"])]
    oracle, _ = load(write_jsonl(tmp_path / "o.jsonl", [conversational(*pair) for pair in expected]), chat_tok)
    assert ids_of(pairs) == ids_of(oracle)
    assert [(p.index, p.row, p.turn) for p in pairs] == [(0, 0, 0), (1, 0, 1), (2, 1, 0)]
    assert pairs[0].prompt == pairs[1].prompt[: len(pairs[0].prompt)]  # the later turn's prompt extends the earlier
    # ... by the earlier turn's chosen answer as trained: one prefix tree computes turn 0's sequence once (data.trees)
    head = pairs[0].prompt + pairs[0].chosen
    assert pairs[1].prompt[: len(head)] == head
    sequences = [pair.prompt + response for pair in pairs[:2] for response in (pair.chosen, pair.rejected)]
    assert trees_length(pairs[:2]) == len({tuple(ids[:n]) for ids in sequences for n in range(1, len(ids) + 1)})
    shared, _ = load(write_jsonl(tmp_path / "c.jsonl", [conversational(*expected[2])]), chat_tok)
    assert ids_of(shared) == ids_of(pairs[2:])  # a single-pair row: what the conversational row gives today


@pytest.fixture(scope="module")
def qwen_tok():
    """The Qwen tokenizer, whose EOS (<|im_end|>) ends the Qwen 3 style template's turns."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(shared_path("tokenizers", "qwen2")))


def test_tools_tool_calls_and_reasoning_reach_the_chat_template(tmp_path, qwen_tok):
    """tools, an assistant's tool_calls, a tool message and reasoning_content, rendered by the template: the pair's ids
    are transformers' own rendering of the conversation, and the oracle's conversational pair's."""
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}
    messages = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "4"},
        {"role": "assistant", "content": "It is 4.", "reasoning_content": "The tool said 4.", "rejected": "It is 5."},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": messages, "tools": tools}])
    (pair,), report = load(path, qwen_tok, template=QWEN3_STYLE)
    assert report.counts == {}
    ids = lambda conversation, **kw: qwen_tok.apply_chat_template(
        conversation, chat_template=QWEN3_STYLE, tools=tools, tokenize=True, return_dict=False, **kw
    )
    chosen = {k: v for k, v in messages[-1].items() if k != "rejected"}
    assert pair.prompt == ids(messages[:-1], add_generation_prompt=True)
    assert pair.prompt + pair.chosen == ids([*messages[:-1], chosen])[:-1]  # the template's "\n" after its EOS
    assert "<think>\nThe tool said 4.\n</think>\n\nIt is 4." in qwen_tok.decode(pair.chosen)
    shown = qwen_tok.decode(pair.prompt)
    assert "# Tools" in shown and '<tool_call>\n{"name": "add"' in shown and "<tool_response>\n4" in shown
    oracle, _ = load(
        write_jsonl(tmp_path / "o.jsonl", [conversational(*turn_oracle(messages)[0], tools)]),
        qwen_tok,
        template=QWEN3_STYLE,
    )
    assert ids_of(oracle) == [(pair.prompt, pair.chosen, pair.rejected)]


def test_empty_think_block_trained_or_moved_into_the_prompt(tmp_path, qwen_tok):
    """Qwen 3's template opens every final answer with an empty think block: trained by default (TRL's behaviour);
    `chat_template_kwargs: {enable_thinking: false}` puts it into the generation prompt; `train_empty_think: false`
    moves it there by itself: the same ids, its tokens conditioned on, not trained."""
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CONVERSATION[1:3]}])
    ids = lambda conversation, **kw: qwen_tok.apply_chat_template(
        conversation, chat_template=QWEN3_STYLE, tokenize=True, return_dict=False, **kw
    )
    (trained,), _ = load(path, qwen_tok, template=QWEN3_STYLE)
    assert qwen_tok.decode(trained.chosen).startswith("<think>\n\n</think>\n\nHello!")
    assert trained.prompt == ids(CONVERSATION[1:2], add_generation_prompt=True)
    (kwargs,), _ = load(path, qwen_tok, template=QWEN3_STYLE, chat_template_kwargs={"enable_thinking": False})
    assert kwargs.prompt == ids(CONVERSATION[1:2], add_generation_prompt=True, enable_thinking=False)
    assert qwen_tok.decode(kwargs.chosen) == f"Hello!{qwen_tok.eos_token}"
    (moved,), report = load(path, qwen_tok, template=QWEN3_STYLE, train_empty_think=False)
    assert moved == kwargs and report.counts == {}
    assert trained.prompt + trained.chosen == moved.prompt + moved.chosen  # the same text, cut elsewhere
