"""LoRA adapters for the DiT: the file format, resolving an adapter like a model, and fusing it into the weights.

The format is what diffusers' ``SanaLoraLoaderMixin`` and peft read and write for a Sana transformer: a
safetensors file of ``transformer.<module>.lora_A.weight`` (rank, in) and ``transformer.<module>.lora_B.weight``
(out, rank) pairs (1×1 convolutions keep their trailing 1×1 dims), with the peft settings (``r``, ``lora_alpha``,
``target_modules``) in the ``lora_adapter_metadata`` header entry that diffusers' ``save_lora_weights`` writes. Our
own entry, ``compactedit.adapter``, adds the base model, its revision and how the adapter was trained. Only
safetensors are read: nothing is ever unpickled.

Fusing adds ``scale · alpha / rank · B @ A`` to each targeted weight once, at load, so edits run at the base
model's speed. A scale of 0 touches nothing, so it equals the base bit for bit. The sums run in float32 and are
rounded once into the weight's dtype. Adapters stack: each one's delta is added in the order given.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

PREFIX = "transformer."
PEFT_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
OUR_METADATA_KEY = "compactedit.adapter"
SCHEMA = "compactedit-lora/1"
_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


@dataclass
class Adapter:
    """A read adapter: per module, its (A, B) matrices, and what its header says."""

    path: Path
    spec: str
    rank: int
    alpha: float
    target_modules: list[str]
    pairs: dict[str, tuple[Any, Any]]  # module name (no prefix) -> (lora_A, lora_B) tensors
    info: dict[str, Any] = field(default_factory=dict)  # our header entry (base model, revision, training)

    @property
    def base_model(self) -> str | None:
        return self.info.get("base_model")


def adapter_metadata(rank: int, alpha: float, target_modules: Sequence[str], info: dict[str, Any]) -> dict[str, str]:
    """The safetensors header of an adapter file: peft's settings as diffusers stores them, and ours."""
    peft = {"r": rank, "lora_alpha": alpha, "target_modules": sorted(target_modules), "use_dora": False}
    return {
        "format": "pt",
        PEFT_METADATA_KEY: json.dumps({f"{PREFIX}{k}": v for k, v in peft.items()}, indent=2, sort_keys=True),
        OUR_METADATA_KEY: json.dumps(
            {"schema": SCHEMA, "rank": rank, "alpha": alpha, "target_modules": sorted(target_modules), **info},
            sort_keys=True,
        ),
    }


def resolve_adapter(spec: str, *, offline: bool = False) -> Path:
    """A local file as given, else ``owner/name/FILE`` fetched through the Hugging Face cache (offline: the cache
    only). A spec that is neither is a model error naming it."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if path.exists():
        raise CheckpointError(f"LoRA adapter {spec} is not a file")
    from .hub import REPO_ID, cache_dir

    parts = spec.split("/")
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    if spec.startswith((".", "/", "~")) or not filename or not REPO_ID.match(repo_id) or ".." in parts:
        raise CheckpointError(f"LoRA adapter not found: {spec} (a local file, or owner/name/FILE on the hub)")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, filename, cache_dir=cache_dir(), local_files_only=True))
    except LocalEntryNotFoundError:
        if offline:
            raise CheckpointError(f"LoRA adapter {spec} is not in the Hugging Face cache (offline)") from None
    try:
        return Path(hf_hub_download(repo_id, filename, cache_dir=cache_dir()))
    except (EntryNotFoundError, RepositoryNotFoundError) as exc:
        raise CheckpointError(f"LoRA adapter {spec} was not found on the Hub") from exc
    except Exception as exc:  # the hub client's network errors
        raise CheckpointError(f"downloading LoRA adapter {spec} failed ({type(exc).__name__})") from exc


def read_adapter(path: Path, spec: str | None = None) -> Adapter:
    """Read and check an adapter file's names and header; shapes are checked against a model by :func:`fuse`."""
    from safetensors import SafetensorError, safe_open

    label = spec or str(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"LoRA adapter {label} is not a readable safetensors file ({exc})") from exc
    try:
        peft = json.loads(header.get(PEFT_METADATA_KEY, "{}"))
        info = json.loads(header.get(OUR_METADATA_KEY, "{}"))
    except ValueError as exc:
        raise CheckpointError(f"LoRA adapter {label}: its metadata is not valid JSON") from exc
    pairs: dict[str, list[Any]] = {}
    for name, tensor in tensors.items():
        suffix = next((s for s in _SUFFIXES if name.endswith(s)), None)
        if not name.startswith(PREFIX) or suffix is None:
            raise CheckpointError(f"LoRA adapter {label}: tensor {name} is not a transformer LoRA weight")
        module = name[len(PREFIX) : -len(suffix)]
        pairs.setdefault(module, [None, None])[_SUFFIXES.index(suffix)] = tensor
    if not pairs:
        raise CheckpointError(f"LoRA adapter {label} holds no LoRA weights")
    for module, (down, up) in pairs.items():
        if down is None or up is None:
            missing = "lora_A" if down is None else "lora_B"
            raise CheckpointError(f"LoRA adapter {label}: tensor {PREFIX}{module}.{missing}.weight is missing")
    ranks = {down.shape[0] for down, _ in pairs.values()}
    rank = peft.get(f"{PREFIX}r", info.get("rank"))
    if rank is None and len(ranks) == 1:
        rank = next(iter(ranks))
    alpha = peft.get(f"{PREFIX}lora_alpha", info.get("alpha", rank))
    if not isinstance(rank, int) or rank <= 0 or not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise CheckpointError(f"LoRA adapter {label}: its metadata gives no valid rank and alpha")
    targets = peft.get(f"{PREFIX}target_modules", info.get("target_modules", []))
    return Adapter(path, label, rank, float(alpha), list(targets), {k: (a, b) for k, (a, b) in pairs.items()}, info)


def lora_delta(down: Any, up: Any) -> Any:
    """``B @ A`` in float32, shaped as the base weight (a Linear's (out, in), a 1×1 conv's (out, in, 1, 1)).

    peft's ``get_delta_weight`` for Linear and 1×1 ``Conv2d`` layers, without the scaling."""
    product = up.float().flatten(1) @ down.float().flatten(1)
    return product.view(up.shape[0], *down.shape[1:]) if down.dim() == 4 else product


def _check(adapter: Adapter, modules: dict[str, Any]) -> None:
    """Every pair must target a weight of the model with matching shapes; the error names the tensor."""
    import torch

    for module, (down, up) in adapter.pairs.items():
        layer = modules.get(module)
        name = f"{PREFIX}{module}"
        weight = getattr(layer, "weight", None)
        if not isinstance(weight, torch.Tensor) or not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
            raise CheckpointError(
                f"LoRA adapter {adapter.spec} does not fit this model: tensor {name}.lora_A.weight targets "
                f"no linear or convolution layer (made for another base model?)"
            )
        kernel = tuple(weight.shape[2:])
        if isinstance(layer, torch.nn.Conv2d) and kernel != (1, 1):
            raise CheckpointError(f"LoRA adapter {adapter.spec}: tensor {name} targets a {kernel} convolution")
        rank = down.shape[0]
        want_down, want_up = (rank, weight.shape[1], *kernel), (weight.shape[0], rank, *((1, 1) if kernel else ()))
        for label, tensor, want in (("lora_A", down, want_down), ("lora_B", up, want_up)):
            if tuple(tensor.shape) != tuple(want):
                raise CheckpointError(
                    f"LoRA adapter {adapter.spec} does not fit this model: tensor {name}.{label}.weight has shape "
                    f"{list(tensor.shape)}, the model needs {list(want)} (made for another base model?)"
                )


def fuse(transformer: Any, adapters: Iterable[tuple[Adapter, float]]) -> None:
    """Add each adapter's ``scale · alpha / rank · B @ A`` into the transformer's weights, after checking all of
    them first (a refused adapter leaves the weights untouched)."""
    import torch

    chosen = list(adapters)
    modules = dict(transformer.named_modules())
    for adapter, _ in chosen:
        _check(adapter, modules)
    with torch.no_grad():
        for adapter, scale in chosen:
            if scale == 0:
                continue
            factor = scale * adapter.alpha / adapter.rank
            for module, (down, up) in adapter.pairs.items():
                weight = modules[module].weight
                delta = lora_delta(down.to(weight.device), up.to(weight.device))
                weight.copy_((weight.float() + factor * delta).to(weight.dtype))


def apply_loras(
    transformer: Any, loras: Sequence[tuple[str, float]], *, offline: bool = False, base_model: str | None = None
) -> list[str]:
    """Resolve, read, check and fuse ``(spec, scale)`` adapters; returns a note for each adapter recorded as made
    for another base model (same shapes, so it loads, but it may not do what it did there)."""
    adapters = [(read_adapter(resolve_adapter(spec, offline=offline), spec), scale) for spec, scale in loras]
    fuse(transformer, adapters)
    return [
        f"LoRA adapter {adapter.spec} was trained on {adapter.base_model}, not {base_model}"
        for adapter, _ in adapters
        if adapter.base_model and base_model and adapter.base_model != base_model
    ]
