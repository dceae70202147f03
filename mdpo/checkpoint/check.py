"""`mdpo convert ... --check`: the converted model against an independent forward of the HF folder, on rows of the
user's own data (or generated ids), as ms-swift's `--test_convert_precision` does.

The independent forwards never run a model folder's remote code and share nothing with mdpo's mapping tables:
transformers' own class for the families it has (Llama 2 / 3.x, Qwen 2 / 2.5, Qwen 3, Mistral), loading the folder
with its config.json; for Qwen 1.0 `Qwen2ForCausalLM` with Qwen 1.0's tensors mapped by hand (equal KV
heads, c_attn split into q/k/v, gate = w2, up = w1); `LlamaForCausalLM` after splitting `W_pack` and normalising
the head's rows for Baichuan 2 7B (RoPE); a float64 plain-PyTorch model for Baichuan 2 13B (ALiBi, NormHead). Both
sides run in float32 whatever the checkpoint's dtype (bf16 weights are upcast exactly on both), so the check tests
the conversion, not bf16 rounding, and one tolerance holds: max |logit error| <= 1e-4, and each sequence's summed
log-prob within 1e-4 per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from mdpo import parallel
from mdpo.checkpoint.hf import HFWeights
from mdpo.checkpoint.load import load_lora_checkpoint, load_megatron_weights, lora_meta
from mdpo.config import DataConfig, Layout, ModelConfig
from mdpo.data.encoding import load_tokenizer
from mdpo.data.pairs import TokenizeReport, load_pairs
from mdpo.errors import MdpoError
from mdpo.models.gpt import build_gpt_model, transformer_config

TOLERANCE = 1e-4  # float32, on every logit; per token on a sequence's summed log-prob
GENERATED_LENGTH = 64  # tokens per generated row


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    weights = HFWeights(folder)
    return {name: weights[name].double() for name in weights}


def _llama_like(cls, config, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = cls(config).double()
    model.load_state_dict({k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}, strict=True)
    return model.eval()


def _qwen(model: ModelConfig, sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Qwen 1.0 == Qwen2ForCausalLM with equal KV heads, c_attn split into q/k/v, gate = w2, up = w1."""
    h = model.hidden_size
    mapped = {
        "model.embed_tokens.weight": sd["transformer.wte.weight"],
        "model.norm.weight": sd["transformer.ln_f.weight"],
        "lm_head.weight": sd["lm_head.weight"],
    }
    for i in range(model.num_hidden_layers):
        src, dst = f"transformer.h.{i}.", f"model.layers.{i}."
        for kind in ("weight", "bias"):
            q, k, v = sd[src + f"attn.c_attn.{kind}"].split(h)
            mapped.update(
                {
                    dst + f"self_attn.q_proj.{kind}": q,
                    dst + f"self_attn.k_proj.{kind}": k,
                    dst + f"self_attn.v_proj.{kind}": v,
                }
            )
        mapped.update(
            {
                dst + "self_attn.o_proj.weight": sd[src + "attn.c_proj.weight"],
                dst + "input_layernorm.weight": sd[src + "ln_1.weight"],
                dst + "post_attention_layernorm.weight": sd[src + "ln_2.weight"],
                dst + "mlp.gate_proj.weight": sd[src + "mlp.w2.weight"],
                dst + "mlp.up_proj.weight": sd[src + "mlp.w1.weight"],
                dst + "mlp.down_proj.weight": sd[src + "mlp.c_proj.weight"],
            }
        )
    config = Qwen2Config(
        vocab_size=model.vocab_size,
        hidden_size=h,
        intermediate_size=model.intermediate_size,
        num_hidden_layers=model.num_hidden_layers,
        num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.num_attention_heads,
        rms_norm_eps=model.rms_norm_eps,
        rope_theta=model.rope_theta,
        max_position_embeddings=model.max_position_embeddings,
        tie_word_embeddings=False,
        use_sliding_window=False,
    )
    return _llama_like(Qwen2ForCausalLM, config, mapped)


def _baichuan_rope(model: ModelConfig, sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Baichuan 2 7B == LlamaForCausalLM after splitting W_pack and normalising the head's rows."""
    mapped = {}
    for name, tensor in sd.items():
        if name.endswith("W_pack.weight"):
            for part, piece in zip("qkv", tensor.split(model.hidden_size)):
                mapped[name.replace("W_pack", f"{part}_proj")] = piece
        elif name == "lm_head.weight":
            mapped[name] = tensor / tensor.norm(dim=-1, keepdim=True)
        else:
            mapped[name] = tensor
    config = LlamaConfig(
        vocab_size=model.vocab_size,
        hidden_size=model.hidden_size,
        intermediate_size=model.intermediate_size,
        num_hidden_layers=model.num_hidden_layers,
        num_attention_heads=model.num_attention_heads,
        rms_norm_eps=model.rms_norm_eps,
        max_position_embeddings=model.max_position_embeddings,
        tie_word_embeddings=False,
    )
    return _llama_like(LlamaForCausalLM, config, mapped)


def baichuan_alibi_logits(model: ModelConfig, sd: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """Baichuan 2 13B in float64 plain PyTorch: ALiBi bias slope_h * key_position on the scores (Baichuan's form),
    causal mask, no position embedding, NormHead. tokens [b, s] -> logits [b, s, vocab]."""
    n, h, eps = model.num_attention_heads, model.hidden_size, model.rms_norm_eps
    d, (b, s) = h // n, tokens.shape
    closest = 2 ** int(math.log2(n))
    base = [2 ** (-8 * (i + 1) / closest) for i in range(closest)]
    extra = [2 ** (-8 * (i + 1) / (2 * closest)) for i in range(2 * closest)][0::2][: n - closest]
    slopes = torch.tensor(base + extra, dtype=torch.float64, device=tokens.device)
    bias = slopes[:, None, None] * torch.arange(s, dtype=torch.float64, device=tokens.device)[None, None, :]
    bias = bias + torch.full((s, s), float("-inf"), dtype=torch.float64, device=tokens.device).triu(1)
    rms = lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
    x = sd["model.embed_tokens.weight"][tokens]
    for i in range(model.num_hidden_layers):
        p = lambda name, i=i: sd[f"model.layers.{i}.{name}.weight"]
        q, k, v = (
            t.reshape(b, s, n, d).transpose(1, 2)
            for t in (rms(x, p("input_layernorm")) @ p("self_attn.W_pack").T).split(h, -1)
        )
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + bias, dim=-1) @ v
        x = x + attn.transpose(1, 2).reshape(b, s, h) @ p("self_attn.o_proj").T
        y = rms(x, p("post_attention_layernorm"))
        x = x + (F.silu(y @ p("mlp.gate_proj").T) * (y @ p("mlp.up_proj").T)) @ p("mlp.down_proj").T
    head = sd["lm_head.weight"]
    return rms(x, sd["model.norm.weight"]) @ (head / head.norm(dim=-1, keepdim=True)).T


# families transformers has its own class for
HF_NATIVE = ("llama", "qwen2", "qwen3", "mistral", "qwen3_moe", "mixtral")


def hf_logits(hf_dir: Path, model: ModelConfig, rows: list[list[int]]) -> list[torch.Tensor]:
    """The independent forward (float64) of a HF folder of `model`'s family: logits [s, vocab] per row. Families
    transformers knows are its own class reading the folder as it is (config.json included: RoPE scaling, tied
    head, head size, q/k norms); Qwen 1.0 and Baichuan 2, whose model code is remote, the stand-ins above."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if model.family in HF_NATIVE:
        module = AutoModelForCausalLM.from_pretrained(
            hf_dir,
            attn_implementation="eager",
            experts_implementation="eager",  # float64 takes no grouped GEMM
        )
        module = module.double().eval()
        forward = lambda tokens: module.to(device)(tokens).logits
    else:
        sd = {k: v.to(device) for k, v in _weights(hf_dir).items()}
        if model.family == "baichuan" and model.position_embedding == "alibi":
            forward = lambda tokens: baichuan_alibi_logits(model, sd, tokens)
        else:
            module = (_qwen if model.family == "qwen" else _baichuan_rope)(model, sd).to(device)
            forward = lambda tokens: module(tokens).logits
    with torch.no_grad():
        return [forward(torch.tensor([row], device=device))[0] for row in rows]


def megatron_logits(ckpt: Path, model: ModelConfig, rows: list[list[int]]) -> list[torch.Tensor]:
    """mdpo's own forward (float32, one process) of a Megatron checkpoint: logits [s, vocab] per row."""
    parallel.start(Layout())
    tensor_parallel.model_parallel_cuda_manual_seed(0)  # Megatron's local attention forks this RNG (dropout 0)
    try:
        module = build_gpt_model(model, transformer_config(model, params_dtype=torch.float32, init_weights=False))
        if torch.cuda.is_available():
            module.cuda()
        if lora_meta(ckpt) is not None:  # mdpo's own LoRA forward: the base and the adapters, unmerged
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
    length = min(1024, model.max_position_embeddings // 2, model.sliding_window or 1024)
    config = DataConfig(
        train_file=str(data), tokenizer=str(tokenizer_dir), max_length=length, on_bad_row="skip", cache=False
    )
    pairs = load_pairs(config, str(data), tokenizer, TokenizeReport())
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
