"""Offline demo assets: a tiny char-level tokenizer and a learnable "echo" preference task.

``mdpo demo`` must run end to end with no network access, so everything here is generated locally and
deterministically. The prompt is a digit string (``"48213="``); the chosen answer repeats it exactly, the rejected
one has one digit wrong. A two-layer model learns the rule (copy the digit five places back) from DPO alone and
applies it to strings it never saw, which is what the held-out accuracy measures. (Small-operand arithmetic was
tried first: DPO from random init memorised the training problems but stayed near chance on held-out ones.)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from mdpo.errors import ConfigError

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SPECIAL_TOKENS = (BOS, EOS, PAD, UNK)

# Every single character the demo prompts/answers (and a little free text) may use. Anything
# else becomes <unk> instead of raising, so a stray character never crashes the demo.
_CHARS = "0123456789+-=*/?!.,:;'\"()[] \nabcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _demo_vocab() -> dict[str, int]:
    """Specials first (ids 0-3), then one id per character; stable so saved ids never drift."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in _CHARS:
        vocab.setdefault(ch, len(vocab))
    return vocab


def build_demo_tokenizer(out_dir: str | Path) -> PreTrainedTokenizerFast:
    """Build, save to ``out_dir`` and return a char-level tokenizer (~90 tokens).

    One token per character keeps the vocabulary tiny (so the demo model's embedding is cheap)
    and makes digits individually visible to the model, which is what makes copying learnable position by position.
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


def echo_pair(digits: str, rng: random.Random) -> dict:
    """Prompt "<digits>=": the chosen answer repeats the digits exactly, the rejected one has one digit wrong."""
    position = rng.randrange(len(digits))
    wrong = rng.choice([d for d in "0123456789" if d != digits[position]])
    return {"prompt": f"{digits}=", "chosen": digits, "rejected": digits[:position] + wrong + digits[position + 1 :]}


def echo_pairs(n: int, seed: int, length: int = 5, exclude: frozenset[str] = frozenset()) -> list[dict]:
    """`n` pairs of distinct random digit strings, none of them in `exclude`; deterministic in `seed`."""
    if n > 10**length - len(exclude):
        raise ConfigError(f"cannot draw {n} distinct {length}-digit strings")
    rng = random.Random(seed)
    seen: set[str] = set(exclude)
    rows = []
    while len(rows) < n:
        digits = "".join(rng.choice("0123456789") for _ in range(length))
        if digits not in seen:
            seen.add(digits)
            rows.append(echo_pair(digits, rng))
    return rows


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    """Write one JSON object per line (the trainer's preference-data format); returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return p


def make_demo_data(out_dir: str | Path, n_train: int = 4096, n_eval: int = 128, seed: int = 0) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``eval.jsonl`` under ``out_dir``; return their paths.

    No eval string appears in train, so eval reward accuracy measures whether the preference (faithful copy over
    a corrupted one) was learned as a rule rather than memorised pair by pair.
    """
    train_rows = echo_pairs(n_train, seed)
    eval_rows = echo_pairs(n_eval, seed + 1, exclude=frozenset(r["chosen"] for r in train_rows))
    out = Path(out_dir)
    return write_jsonl(train_rows, out / "train.jsonl"), write_jsonl(eval_rows, out / "eval.jsonl")
