"""load_pairs: file types, schemas, templates, exact token ids, length policy, bad rows and the on-disk cache."""

from __future__ import annotations

import gzip
import json
import os
import shutil

import pytest
from conftest import shared_path

from mdpo.config import DataConfig, load_config
from mdpo.data.formats import RowError, hh_messages
from mdpo.data.pairs import TokenizeReport, load_pairs
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
    "'chosen'[0]: role 'tool' is not system, user or assistant": {
        **uf(),
        "chosen": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}],
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
    ],
)
def test_data_config_fields_are_checked(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["data.train_file=x", "data.tokenizer=y", override])


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
