"""Read and write HF model folders: safetensors read lazily (one tensor at a time), legacy .bin only with
weights_only=True, sharded safetensors with an index written by huggingface_hub."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict
from safetensors import safe_open

from mdpo.checkpoint import fp8, mxfp4
from mdpo.checkpoint.files import CHECKPOINT_FILES
from mdpo.errors import MdpoError
from mdpo.models.families.base import Family

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# tensors a release keeps in float32 whatever its dtype, left out of the folder's dtype: DeepSeek V3's router score
# correction bias (bf16 weights beside it; Megatron-Core keeps its expert_bias in float32 too)
FLOAT32_KEPT = ("e_score_correction_bias",)
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def weight_files(folder: Path) -> list[Path]:
    """A HF folder's unindexed weight files: its safetensors, else its PyTorch .bin shards."""
    return sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))


class HFWeights(Mapping[str, torch.Tensor]):
    """The tensors of a HF model folder, read on access. Shapes and dtypes come from the safetensors headers, so
    names and shapes are checked before any tensor is read, and a converter holds one tensor at a time. Quantized
    tensors are the tensors they stand for, dequantized on access into the dtype of the folder's other tensors:
    MXFP4 (`<name>_blocks` and `<name>_scales`: gpt-oss's released experts, `checkpoint.mxfp4`) and FP8 (`<name>` in
    float8_e4m3fn with its block scales `<name>_scale_inv`: DeepSeek V3's released weights, `checkpoint.fp8`)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._file: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self._eager: dict[str, torch.Tensor] = {}
        self.shard_files = shards = self._shards()
        if shards[0].suffix == ".safetensors":
            for shard in shards:
                try:
                    with safe_open(str(shard), framework="pt") as f:
                        for name in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                            piece = f.get_slice(name)
                            self._file[name] = shard
                            self.shapes[name] = tuple(piece.get_shape())
                            self.dtypes[name] = _DTYPES[piece.get_dtype()]
                except Exception as err:  # safetensors raises its own types for truncated or corrupt files
                    raise MdpoError(f"{shard}: cannot read safetensors file ({err})") from None
        else:
            for shard in shards:
                try:
                    self._eager.update(torch.load(shard, map_location="cpu", weights_only=True))
                except Exception as err:
                    raise MdpoError(f"{shard}: cannot read PyTorch weights ({str(err).splitlines()[0]})") from None
            self.shapes = {k: tuple(v.shape) for k, v in self._eager.items()}
            self.dtypes = {k: v.dtype for k, v in self._eager.items()}
        self._quantized = self._read_quantized()

    def _read_quantized(self) -> dict[str, tuple[str, str]]:
        """The MXFP4 tensors (`mxfp4.quantized_pairs`) and the FP8 ones (`fp8.quantized_pairs`, their block size
        `self.block`), listed under the names they stand for, in the other tensors' dtype."""
        try:
            self.block = fp8.block_size(self.folder) if fp8.DTYPE in self.dtypes.values() else fp8.DEFAULT_BLOCK
            pairs = mxfp4.quantized_pairs(set(self.shapes))
            shapes = {name: mxfp4.dequantized_shape(*map(self.shapes.get, pair), name) for name, pair in pairs.items()}
            scales = fp8.quantized_pairs(self.shapes, self.dtypes, self.block)
        except ValueError as err:
            raise MdpoError(f"{self.folder}: {err}") from None
        for part in [*(p for pair in pairs.values() for p in pair), *scales.values()]:
            del self.shapes[part], self.dtypes[part]
        shapes |= {name: self.shapes[name] for name in scales}
        others = [d for name, d in self.dtypes.items() if name not in scales and not name.endswith(FLOAT32_KEPT)]
        dtype = others[0] if others else torch.bfloat16  # the other tensors' (one: `dtype()` checks)
        self.shapes |= shapes
        self.dtypes |= dict.fromkeys(shapes, dtype)
        return pairs | {name: (name, scale) for name, scale in scales.items()}

    def _shards(self) -> list[Path]:
        for index_name in INDEX_FILES:
            index = self.folder / index_name
            if index.is_file():
                try:
                    files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                except (ValueError, KeyError, AttributeError) as err:
                    raise MdpoError(f"{index}: not a valid weight index ({err})") from None
                missing = [f for f in files if not (self.folder / f).is_file()]
                if missing:
                    raise MdpoError(f"{index}: names shard '{missing[0]}', which is not in {self.folder}")
                return [self.folder / f for f in files]
        shards = weight_files(self.folder)
        if not shards:
            raise MdpoError(f"{self.folder}: no *.safetensors or pytorch_model*.bin weights found")
        return shards

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self._quantized:
            values, scales = (self._read(part) for part in self._quantized[name])
            if values.dtype == fp8.DTYPE:
                return fp8.dequantize(values, scales, self.block, self.dtypes[name])
            return mxfp4.dequantize(values, scales, self.dtypes[name])
        return self._read(name)

    def _read(self, name: str) -> torch.Tensor:
        if self._eager:
            return self._eager[name]
        shard = self._file[name]
        try:
            with safe_open(str(shard), framework="pt") as f:
                return f.get_tensor(name)
        except Exception as err:
            raise MdpoError(f"{shard}: cannot read tensor '{name}' ({err})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def dtype(self) -> torch.dtype:
        """The one floating dtype of the weights, FLOAT32_KEPT aside (mixed dtypes are refused: a conversion keeps
        the dtype)."""
        dtypes = [d for name, d in self.dtypes.items() if not name.endswith(FLOAT32_KEPT)]
        found = sorted({str(d) for d in dtypes})
        if len(found) != 1:
            raise MdpoError(f"{self.folder}: weights mix dtypes {', '.join(found)}; expected one")
        return dtypes[0]


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "F8_E4M3": torch.float8_e4m3fn,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def is_auxiliary(path: Path) -> bool:
    """Files of a HF model folder that are neither weights nor config.json: tokenizer, generation config, remote
    model code. They travel with a conversion unchanged (and a checkpoint's own files never do)."""
    return (
        path.is_file()
        and not path.name.endswith((*WEIGHT_SUFFIXES, ".distcp"))
        and path.name not in (*INDEX_FILES, *CHECKPOINT_FILES, "config.json")
    )


CARRIED_FILE = "carried.safetensors"  # a converted checkpoint's copy of the tensors its family carries untrained


def carried_tensors(family: Family, origin: Path | None, num_layers: int) -> Mapping[str, torch.Tensor]:
    """The tensors `family` carries untrained (`Family.carried`: a vision tower; layers past the model's
    `num_layers`: DeepSeek-V3's multi-token prediction), read on access from the folder an export starts from: the HF
    folder's weights, or a converted checkpoint's CARRIED_FILE (its only safetensors); none for other families.
    MdpoError, naming the folder, when the `carried` ones are not there (extra layers are optional): called before
    training too."""
    if not family.carried and not family.carries_extra_layers:
        return {}
    has_weights = origin is not None and (
        any((origin / index).is_file() for index in INDEX_FILES) or weight_files(origin)
    )
    weights = HFWeights(origin) if has_weights else {}
    names = [name for name in weights if family.is_carried(name, num_layers)]
    if not names and family.carried:
        where = f"the source folder {origin}" if origin is not None else "no source folder (model.init_from is unset)"
        raise MdpoError(
            f"a {family.architecture} export carries its untrained tensors ({family.carried_names()}) from {where}, "
            "which holds none"
        )
    return _Subset(weights, names)


class _Subset(Mapping[str, torch.Tensor]):
    """Some of a lazy mapping's tensors, still read on access."""

    def __init__(self, weights: Mapping[str, torch.Tensor], names: list[str]) -> None:
        self.weights, self.names = weights, names

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise KeyError(name)
        return self.weights[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def copy_auxiliary(src: str | Path, dst: str | Path) -> list[str]:
    copied = []
    for path in sorted(Path(src).iterdir()):
        if is_auxiliary(path):
            shutil.copy2(path, Path(dst) / path.name)
            copied.append(path.name)
    return copied


def _own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor that is a slice of a larger one (vocab padding stripped, gate/up split) gets its own storage, as
    safetensors refuses to write part of a storage."""
    tensor = tensor.contiguous()
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        return tensor.clone()
    return tensor


def write_hf_folder(folder: str | Path, state: dict[str, torch.Tensor], config: dict, max_shard_size: str = "5GB"):
    """A folder `transformers` loads: config.json and safetensors shards (with an index when more than one)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {name: _own_storage(t) for name, t in state.items()}
    save_torch_state_dict(state, folder, max_shard_size=max_shard_size, metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder
