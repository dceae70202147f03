"""Offline demo assets: a tiny char-level tokenizer and a learnable arithmetic preference task.

``mdpo demo`` must run end to end with no network access, so everything here is generated
locally and deterministically. The task is small-operand addition/subtraction written
compactly (``"12+7="`` -> ``"19"``); the rejected answer is a near miss (off by 1-3, or the
digits swapped), so a ~1M-parameter model can pick up the preference from the last digit and
the magnitude of the answer within a couple of hundred DPO steps.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from mdpo.errors import ConfigError

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SPECIAL_TOKENS = (BOS, EOS, PAD, UNK)

# Every single character the demo prompts/answers (and a little free text) may use. Anything
# else becomes <unk> instead of raising, so a stray character never crashes the demo.
_CHARS = "0123456789+-=*/?!.,:;'\"()[] \nabcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"

Problem = tuple[int, str, int]


def _demo_vocab() -> dict[str, int]:
    """Specials first (ids 0-3), then one id per character; stable so saved ids never drift."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in _CHARS:
        vocab.setdefault(ch, len(vocab))
    return vocab


def build_demo_tokenizer(out_dir: str | Path) -> PreTrainedTokenizerFast:
    """Build, save to ``out_dir`` and return a char-level tokenizer (~90 tokens).

    One token per character keeps the vocabulary tiny (so the demo model's embedding is cheap)
    and makes digits individually visible to the model, which is what makes arithmetic learnable.
    BOS is prepended by the post-processor; EOS is *not* added, because the trainer appends it
    after each response itself.
    """
    vocab = _demo_vocab()
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Isolate every character (newlines included) as its own pre-token.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()  # concatenate characters back with no separator
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A $B:1",
        special_tokens=[(BOS, vocab[BOS])],
    )
    tok.add_special_tokens(list(SPECIAL_TOKENS))

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_tok.save_pretrained(str(out))
    return hf_tok


def _all_problems(max_operand: int) -> list[Problem]:
    """Every ``a+b`` and every non-negative ``a-b`` with operands in ``[0, max_operand]``."""
    if max_operand < 1:
        raise ConfigError(f"max_operand must be >= 1, got {max_operand}")
    probs: list[Problem] = []
    for a in range(max_operand + 1):
        for b in range(max_operand + 1):
            probs.append((a, "+", b))
            if a >= b:  # keep answers non-negative: one fewer thing for a tiny model to learn
                probs.append((a, "-", b))
    return probs


def _answer(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b


def _near_miss(rng: random.Random, correct: int) -> int:
    """A plausible wrong answer: digits swapped (sometimes) or off by 1-3, never negative."""
    s = str(correct)
    if len(s) == 2 and s[0] != s[1] and s[1] != "0" and rng.random() < 0.25:
        return int(s[::-1])
    deltas = [d for d in (-3, -2, -1, 1, 2, 3) if correct + d >= 0]
    return correct + rng.choice(deltas)


def _row(rng: random.Random, problem: Problem) -> dict:
    a, op, b = problem
    correct = _answer(a, op, b)
    wrong = _near_miss(rng, correct)
    assert wrong != correct
    return {"prompt": f"{a}{op}{b}=", "chosen": str(correct), "rejected": str(wrong)}


def arithmetic_pairs(
    n: int,
    seed: int,
    max_operand: int = 20,
    *,
    problems: Sequence[Problem] | None = None,
) -> list[dict]:
    """``n`` preference rows ``{"prompt": "12+7=", "chosen": "19", "rejected": "18"}``.

    Deterministic in ``seed``. Problems are drawn with replacement from all ``a+b`` and
    non-negative ``a-b`` with operands ``<= max_operand`` (or from ``problems`` if given, which
    is how :func:`make_demo_data` keeps eval prompts out of train), so a prompt may repeat with
    a different rejected answer.
    """
    if n < 0:
        raise ConfigError(f"n must be >= 0, got {n}")
    pool = list(problems) if problems is not None else _all_problems(max_operand)
    if not pool and n:
        raise ConfigError("no problems to draw from")
    rng = random.Random(seed)
    return [_row(rng, rng.choice(pool)) for _ in range(n)]


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    """Write one JSON object per line (the trainer's preference-data format); returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return p


def make_demo_data(
    out_dir: str | Path,
    n_train: int = 2000,
    n_eval: int = 128,
    seed: int = 0,
    max_operand: int = 20,
) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``eval.jsonl`` under ``out_dir``; return their paths.

    The eval set is ``n_eval`` distinct problems that never appear in train, so eval reward
    accuracy measures whether the rule was learned rather than the training pairs memorised.
    """
    problems = _all_problems(max_operand)
    if n_eval < 0 or n_eval > len(problems) // 2:
        raise ConfigError(
            f"n_eval must be in [0, {len(problems) // 2}] for max_operand={max_operand} "
            f"(half of the {len(problems)} distinct problems), got {n_eval}"
        )
    random.Random(seed).shuffle(problems)
    eval_problems, train_problems = problems[:n_eval], problems[n_eval:]

    eval_rng = random.Random(seed + 1)
    eval_rows = [_row(eval_rng, p) for p in eval_problems]
    train_rows = arithmetic_pairs(n_train, seed + 2, max_operand, problems=train_problems)

    out = Path(out_dir)
    return write_jsonl(train_rows, out / "train.jsonl"), write_jsonl(eval_rows, out / "eval.jsonl")
