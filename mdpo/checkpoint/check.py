"""`mdpo convert ... --check`: the converted model against an independent forward of the HF folder, on rows of the
user's own data (or generated ids), as ms-swift's `--test_convert_precision` does.

The independent forward is the family's oracle (`Family.oracle`); it never runs a model folder's remote code and
shares nothing with mdpo's mapping tables: transformers' own class for the families it has (Llama 2 / 3.x, Qwen 2 /
2.5, Qwen 3, Mistral, Qwen3-MoE, Qwen2-MoE, Mixtral), loading the folder with its config.json; for Qwen 1.0 and
Baichuan 2, whose model code is remote, the family's float64 stand-in (`mdpo.models.families.oracles`). Both sides
run in float32 whatever the checkpoint's dtype (bf16 weights are upcast exactly on both), so the check tests the
conversion, not bf16 rounding, and one tolerance holds: max |logit error| <= 1e-4, and each sequence's summed
log-prob within 1e-4 per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from megatron.core import tensor_parallel

from mdpo import parallel
from mdpo.checkpoint import fp8
from mdpo.checkpoint.hf import HFWeights
from mdpo.checkpoint.load import checkpoint_lora, load_lora_checkpoint, load_megatron_weights
from mdpo.config import DataConfig, Layout, ModelConfig
from mdpo.data.encoding import load_tokenizer
from mdpo.data.pairs import TokenizeReport, load_pairs
from mdpo.errors import MdpoError
from mdpo.models import families
from mdpo.models.gpt import build_gpt_model, transformer_config

TOLERANCE = 1e-4  # float32, on every logit; per token on a sequence's summed log-prob
GENERATED_LENGTH = 64  # tokens per generated row


def _weights(folder: Path, device: str) -> dict[str, torch.Tensor]:
    weights = HFWeights(folder)
    return {name: weights[name].double().to(device) for name in weights}


def hf_logits(hf_dir: Path, model: ModelConfig, rows: list[list[int]]) -> list[torch.Tensor]:
    """The independent forward (float64) of a HF folder of `model`'s family: logits [s, vocab] per row. Families
    transformers knows are its own class reading the folder as it is (config.json included: RoPE scaling, tied
    head, head size, q/k norms); Qwen 1.0 and Baichuan 2, whose model code is remote, their families' stand-ins."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    oracle = families.get(model.family).oracle
    if isinstance(oracle, str):
        kinds = dict(attn_implementation="eager", experts_implementation="eager")  # float64 takes no grouped GEMM
        if fp8.block_scaled(hf_dir):
            module = _fp8_oracle(getattr(transformers, oracle), hf_dir, kinds)
        else:
            module = getattr(transformers, oracle).from_pretrained(hf_dir, **kinds)
        module = module.double().eval().to(device)
        forward = lambda tokens: module(tokens).logits
    else:
        forward = oracle(model, _weights(hf_dir, device))
    with torch.no_grad():
        return [forward(torch.tensor([row], device=device))[0] for row in rows]


def _fp8_oracle(cls: type, hf_dir: Path, kinds: dict) -> torch.nn.Module:
    """transformers' class of an FP8 folder (DeepSeek V3's release) with the weights mdpo dequantizes: transformers
    dequantizes FP8 only on a GPU (else into bf16, and never blocks cut short by a dimension), and the check compares
    conversions in float32."""
    config = transformers.AutoConfig.from_pretrained(hf_dir)
    del config.quantization_config
    weights = HFWeights(hf_dir)
    return cls.from_pretrained(None, config=config, state_dict={name: weights[name] for name in weights}, **kinds)


def megatron_logits(ckpt: Path, model: ModelConfig, rows: list[list[int]]) -> list[torch.Tensor]:
    """mdpo's own forward (float32, one process) of a Megatron checkpoint: logits [s, vocab] per row."""
    parallel.start(Layout())
    tensor_parallel.model_parallel_cuda_manual_seed(0)  # Megatron's local attention forks this RNG (dropout 0)
    try:
        lora = checkpoint_lora(ckpt)  # mdpo's own LoRA forward: the base and the adapters, unmerged
        config = transformer_config(model, params_dtype=torch.float32, init_weights=False)
        module = build_gpt_model(model, config, lora=lora)
        if torch.cuda.is_available():
            module.cuda()
        if lora is not None:
            load_lora_checkpoint(module, ckpt, model)
        else:
            load_megatron_weights(module, ckpt)
        module.eval()
        device = next(module.parameters()).device
        out = []
        with torch.no_grad():
            for row in rows:
                tokens = torch.tensor([row], device=device)
                positions = torch.arange(len(row), device=device)[None]
                logits = module(input_ids=tokens, position_ids=positions, attention_mask=None)
                out.append(logits[0, :, : model.vocab_size].double())
        return out
    finally:
        parallel.stop()


def check_rows(tokenizer_dir: Path, data: Path | None, count: int, model: ModelConfig) -> list[list[int]]:
    """`count` rows to compare on: prompt + chosen of the data file's first usable pairs (tokenized as training
    would, with the model folder's tokenizer), or seeded random ids."""
    if data is None:
        generator = torch.Generator().manual_seed(0)
        length = min(GENERATED_LENGTH, model.max_position_embeddings)
        return torch.randint(0, model.vocab_size, (count, length), generator=generator).tolist()
    tokenizer = load_tokenizer(str(tokenizer_dir))
    length = min(1024, model.max_position_embeddings // 2)
    config = DataConfig(
        train_file=str(data), tokenizer=str(tokenizer_dir), max_length=length, on_bad_row="skip", cache=False
    )
    pairs = load_pairs(config, str(data), tokenizer, TokenizeReport(), families.get(model.family).default_template)
    return [pair.prompt + pair.chosen for pair in pairs[:count]]


@dataclass(frozen=True)
class CheckResult:
    rows: int
    tokens: int
    max_logit_error: float
    max_logp_error: float  # per sequence, summed over its tokens
    max_logp_error_per_token: float

    @property
    def passed(self) -> bool:
        return self.max_logit_error <= TOLERANCE and self.max_logp_error_per_token <= TOLERANCE

    def summary(self) -> str:
        verdict = "ok" if self.passed else f"FAILED (tolerance {TOLERANCE:g})"
        return (
            f"check: {self.rows} rows, {self.tokens} tokens: max |logit error| {self.max_logit_error:.3g}, "
            f"max per-sequence log-prob difference {self.max_logp_error:.3g} "
            f"({self.max_logp_error_per_token:.3g} per token): {verdict}"
        )


def _sequence_logp(logits: torch.Tensor, row: list[int]) -> float:
    """Sum over the row of log p(token t+1 | tokens up to t)."""
    targets = torch.tensor(row[1:])[:, None]
    return torch.log_softmax(logits[:-1], dim=-1).gather(1, targets).sum().item()


def compare(ours: list[torch.Tensor], oracle: list[torch.Tensor], rows: list[list[int]]) -> CheckResult:
    """Logits and each row's summed next-token log-prob, ours against the oracle's."""
    logit_error = logp_error = per_token = 0.0
    for a, b, row in zip(ours, oracle, rows, strict=True):
        a, b = a.double().cpu(), b.double().cpu()
        logit_error = max(logit_error, (a - b).abs().max().item())
        diff = abs(_sequence_logp(a, row) - _sequence_logp(b, row))
        logp_error, per_token = max(logp_error, diff), max(per_token, diff / max(1, len(row) - 1))
    return CheckResult(len(rows), sum(map(len, rows)), logit_error, logp_error, per_token)


def check_conversion(hf_dir: Path, ckpt: Path, model: ModelConfig, data: Path | None, count: int) -> CheckResult:
    """The converted checkpoint's forward against the HF folder's independent one; raises when over tolerance."""
    rows = check_rows(hf_dir, data, count, model)
    result = compare(megatron_logits(ckpt, model, rows), hf_logits(hf_dir, model, rows), rows)
    print(f"[mdpo] {result.summary()}")
    if not result.passed:
        raise MdpoError(f"{ckpt}: conversion check failed against {hf_dir}: {result.summary()}")
    return result
