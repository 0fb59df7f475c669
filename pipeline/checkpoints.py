"""ConvNeXt checkpoints: read official, timm and torchvision layouts; write the official one.

Everything is converted to the official release's key names (those of `pipeline.model.ConvNeXt`)
by pure per-key functions, so a conversion can be read, tested and inverted one key at a time.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import pickle
import pickletools
import re
import shlex
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.model import VARIANTS

# Outer dicts that training scripts wrap a state_dict in, in order of preference: the official
# release saves {"model": sd} (plus "model_ema" during training), timm/Lightning use "state_dict".
_WRAPPER_KEYS = ("model", "state_dict", "model_ema")
# Top-level keys save_checkpoint owns; `extra` may not overwrite them.
_RESERVED_KEYS = frozenset({"model", "variant", "num_classes", "in_chans"})

_Rule = tuple[re.Pattern[str], Callable[[re.Match[str]], str]]


def _rules(*pairs: tuple[str, Callable[[re.Match[str]], str]]) -> list[_Rule]:
    return [(re.compile(pattern), repl) for pattern, repl in pairs]


def _apply(rules: list[_Rule], key: str) -> str:
    for pattern, repl in rules:
        m = pattern.match(key)
        if m:
            return repl(m) + key[m.end():]
    # Unknown keys pass through unchanged; the strict load then reports them by name.
    return key


# timm/models/convnext.py. Stage 0 of timm has no downsample (its stem does that job).
_TIMM_RULES = _rules(
    (r"stem\.([01])\.", lambda m: f"downsample_layers.0.{m[1]}."),
    (r"stages\.(\d+)\.downsample\.([01])\.", lambda m: f"downsample_layers.{m[1]}.{m[2]}."),
    (r"stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.", lambda m: f"stages.{m[1]}.{m[2]}.dwconv."),
    (r"stages\.(\d+)\.blocks\.(\d+)\.norm\.", lambda m: f"stages.{m[1]}.{m[2]}.norm."),
    (r"stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc1\.", lambda m: f"stages.{m[1]}.{m[2]}.pwconv1."),
    (r"stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc2\.", lambda m: f"stages.{m[1]}.{m[2]}.pwconv2."),
    (r"stages\.(\d+)\.blocks\.(\d+)\.gamma$", lambda m: f"stages.{m[1]}.{m[2]}.gamma"),
    (r"head\.norm\.", lambda m: "norm."),
    (r"head\.fc\.", lambda m: "head."),
)

# torchvision/models/convnext.py: `features` interleaves stem/downsamplers (0, 2, 4, 6) with
# stages (1, 3, 5, 7); a CNBlock is Sequential(dwconv, Permute, LayerNorm, Linear, GELU, Linear,
# Permute), so only block.{0,2,3,5} hold weights.
_TV_BLOCK_PARTS = {"0": "dwconv", "2": "norm", "3": "pwconv1", "5": "pwconv2"}
_TORCHVISION_RULES = _rules(
    (r"features\.([0246])\.([01])\.", lambda m: f"downsample_layers.{int(m[1]) // 2}.{m[2]}."),
    (
        r"features\.([1357])\.(\d+)\.block\.([0235])\.",
        lambda m: f"stages.{(int(m[1]) - 1) // 2}.{m[2]}.{_TV_BLOCK_PARTS[m[3]]}.",
    ),
    (r"features\.([1357])\.(\d+)\.layer_scale$", lambda m: f"stages.{(int(m[1]) - 1) // 2}.{m[2]}.gamma"),
    (r"classifier\.0\.", lambda m: "norm."),
    (r"classifier\.2\.", lambda m: "head."),
)


def timm_key_to_official(key: str) -> str:
    """Rename one timm ConvNeXt state_dict key to the official name (unknown keys unchanged)."""
    return _apply(_TIMM_RULES, key)


def torchvision_key_to_official(key: str) -> str:
    """Rename one torchvision ConvNeXt state_dict key to the official name (unknown keys unchanged)."""
    return _apply(_TORCHVISION_RULES, key)


def unwrap_state_dict(checkpoint: Any) -> dict[str, torch.Tensor]:
    """The state_dict inside a checkpoint ({"model": sd}, {"state_dict": sd}, {"model_ema": sd} or bare),
    with a DataParallel/DDP "module." prefix removed. A whole pickled model (torch.save(model), bare or
    under one of those keys) gives its state_dict: only a weights_only=False load yields one, and the
    re-save recipe of `_load_file` relies on this."""
    if isinstance(checkpoint, nn.Module):
        checkpoint = checkpoint.state_dict()
    if not isinstance(checkpoint, Mapping):
        raise PipelineError(
            f"checkpoint holds a {type(checkpoint).__name__}, not a dict of tensors; "
            "save it with torch.save(model.state_dict(), path)"
        )
    for wrapper in _WRAPPER_KEYS:
        inner = checkpoint.get(wrapper)
        if isinstance(inner, nn.Module):
            inner = inner.state_dict()
        if isinstance(inner, Mapping):
            checkpoint = inner
            break
    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in checkpoint.items()}
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if not sd or bad:
        what = f"non-tensor entry '{bad[0]}'" if bad else "no tensors"
        raise PipelineError(
            f"checkpoint is not a dict of tensors ({what}); "
            "save it with torch.save(model.state_dict(), path)"
        )
    return sd


def detect_layout(state_dict: Mapping[str, Any]) -> str:
    """"official", "timm" or "torchvision", from the key names of a (possibly wrapped) state_dict."""
    keys = list(unwrap_state_dict(state_dict))
    if any(k.startswith("downsample_layers.") for k in keys):
        return "official"
    if any(k.startswith("stem.") or ".blocks." in k for k in keys):
        return "timm"
    if any(k.startswith("features.") for k in keys):
        return "torchvision"
    raise PipelineError(
        f"checkpoint keys are not a ConvNeXt layout (first key: '{keys[0]}'); "
        "pass an official, timm or torchvision ConvNeXt checkpoint"
    )


def to_official(state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Convert a (possibly wrapped) official, timm or torchvision state_dict to official keys and shapes."""
    sd = unwrap_state_dict(state_dict)
    layout = detect_layout(sd)
    rename = {
        "official": lambda k: k,
        "timm": timm_key_to_official,
        "torchvision": torchvision_key_to_official,
    }[layout]
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        new = rename(key)
        if new.endswith(".gamma") and value.ndim == 3:
            # torchvision keeps layer scale as (C, 1, 1) to broadcast over NCHW; ours is (C,), channels-last.
            value = value.reshape(-1)
        elif re.search(r"\.pwconv[12]\.weight$", new) and value.ndim == 4:
            # timm's conv_mlp=True stores the pointwise layers as 1x1 convs: (O, I, 1, 1) -> (O, I).
            value = value.flatten(1)
        if new in out:
            raise PipelineError(
                f"checkpoint keys '{key}' and another both map to '{new}'; pass an unmodified checkpoint"
            )
        out[new] = value
    return out


def _architecture(sd: Mapping[str, torch.Tensor]) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(depths, dims) read off official-layout keys, or None if a stage is missing."""
    blocks: dict[int, set[int]] = {}
    dims: dict[int, int] = {}
    for key, value in sd.items():
        m = re.match(r"stages\.(\d+)\.(\d+)\.dwconv\.weight$", key)
        if m:
            stage, block = int(m[1]), int(m[2])
            blocks.setdefault(stage, set()).add(block)
            dims[stage] = value.shape[0]  # depthwise: (C, 1, 7, 7)
    if not blocks or sorted(blocks) != list(range(len(blocks))):
        return None
    return tuple(len(blocks[i]) for i in sorted(blocks)), tuple(dims[i] for i in sorted(dims))


def guess_variant(state_dict: Mapping[str, Any]) -> str | None:
    """Name of the `VARIANTS` row whose depths and dims the checkpoint has, or None."""
    try:
        arch = _architecture(to_official(state_dict))
    except PipelineError:
        return None
    for name, spec in VARIANTS.items():
        if arch == (spec.depths, spec.dims):
            return name
    return None


def _variant_hint(
    sd: Mapping[str, torch.Tensor],
    guessed: str | None,
    variant: str,
    missing: Sequence[str] = (),
    unexpected: Sequence[str] = (),
) -> str:
    if guessed is not None and guessed != variant:
        return f"it looks like variant '{guessed}', not '{variant}' — pass --variant {guessed}"
    if guessed is None:
        arch = _architecture(sd)
        found = f"depths {arch[0]}, dims {arch[1]}" if arch else "no complete stages"
        return f"it matches no known variant ({found}); pass a ConvNeXt checkpoint of variant '{variant}'"
    # Same depths and dims: the usual culprit is layer scale (gamma) switched on in one and off in the other.
    if unexpected and not missing and all(k.endswith(".gamma") for k in unexpected):
        return (
            "the checkpoint has layer scale (gamma) but the model has none; "
            "create it with layer_scale_init_value=1e-6"
        )
    if missing and not unexpected and all(k.endswith(".gamma") for k in missing):
        return "the model has layer scale (gamma) but the checkpoint has none; create it with layer_scale_init_value=0"
    return f"the architecture is '{variant}' but some layers differ; pass a plain ConvNeXt-{variant} checkpoint"


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# Standard-library callables a pickle can call to run commands or code on load. A checkpoint that
# names one is not weights with an odd wrapper: no re-save recipe is offered for it.
_CODE_MODULES = frozenset({
    "os", "posix", "nt", "sys", "subprocess", "importlib", "runpy", "pty", "socket", "shutil", "ctypes",
    "code", "codeop", "pickle", "marshal", "webbrowser", "multiprocessing", "operator", "functools", "types",
})
_CODE_BUILTINS = frozenset({"eval", "exec", "compile", "__import__", "getattr", "setattr", "open", "breakpoint"})
_STRING_OPS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING",
                         "BINSTRING", "STRING"})


def pickle_globals(path: Path) -> list[str] | None:
    """The globals ("module.name") the pickles of a checkpoint would import, read without running
    anything; None when the file holds no pickle. torch.save's zip keeps its pickle in `*/data.pkl`;
    the legacy torch.save format and a plain pickle.dump file are pickles back to back (raw storage
    bytes after them end the scan)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                streams = [archive.read(name) for name in archive.namelist() if name.endswith(".pkl")]
        else:
            streams = [path.read_bytes()]
    except (OSError, zipfile.BadZipFile, RuntimeError):
        return None
    # Protocol 2 and later (torch.save's and pickle.dump's) start with PROTO; random bytes rarely do.
    streams = [data for data in streams if data[:1] == pickle.PROTO]
    found: list[str] = []
    complete = False
    for data in streams:
        stream = io.BytesIO(data)
        while stream.tell() < len(data):
            pushed: list[Any] = []  # strings and memo reads, for STACK_GLOBAL's two operands
            memo: dict[Any, Any] = {}
            try:
                for opcode, arg, _ in pickletools.genops(stream):
                    name = opcode.name
                    if name == "GLOBAL":
                        found.append(arg.replace(" ", "."))
                    elif name == "STACK_GLOBAL" and len(pushed) >= 2:
                        found.append(f"{pushed[-2]}.{pushed[-1]}")
                    elif name in _STRING_OPS:
                        pushed.append(arg.decode("latin-1") if isinstance(arg, bytes) else arg)
                    elif name == "MEMOIZE" and pushed:
                        memo[len(memo)] = pushed[-1]
                    elif name in ("PUT", "BINPUT", "LONG_BINPUT") and pushed:
                        memo[arg] = pushed[-1]
                    elif name in ("GET", "BINGET", "LONG_BINGET"):
                        pushed.append(memo.get(arg))
            except (ValueError, EOFError, UnicodeDecodeError, pickle.UnpicklingError):
                break
            complete = True
    # Protocol 2 spells Python 3's builtins as Python 2's __builtin__.
    found = [f"builtins.{name[len('__builtin__.'):]}" if name.startswith("__builtin__.") else name for name in found]
    return list(dict.fromkeys(found)) if complete else None


def _refused_globals(path: Path, message: str) -> list[str]:
    """The globals of `path` that weights-only loading refuses (those it names in `message` first)."""
    try:
        from torch._weights_only_unpickler import _get_allowed_globals
        allowed = set(_get_allowed_globals()) | {"argparse.Namespace"}
    except (ImportError, AttributeError):  # a private helper: without it, name every global
        allowed = set()
    # torch's message drops the "builtins." of the names it quotes.
    named = [name if "." in name else f"builtins.{name}" for name in re.findall(r"GLOBAL (\S+)", message)]
    return list(dict.fromkeys(named + [g for g in pickle_globals(path) or [] if g not in allowed]))


def _runs_code(name: str) -> bool:
    module, _, attribute = name.rpartition(".")
    return module.split(".")[0] in _CODE_MODULES or (module == "builtins" and attribute in _CODE_BUILTINS)


def resave_recipe(path: Path) -> tuple[str, Path]:
    """(shell command, file it writes): re-save a trusted checkpoint's weights as a plain state_dict,
    whatever its layout (official {"model": sd}, timm or torchvision bare state_dicts, a training
    checkpoint, a whole pickled model); `unwrap_state_dict` does the unwrapping."""
    out = path.with_name(f"{path.stem}.weights.pth")
    # JSON strings are Python string literals, and their double quotes sit well inside shell single quotes.
    load = f'torch.load({json.dumps(str(path))}, map_location="cpu", weights_only=False)'
    code = (f"import torch; from pipeline.checkpoints import unwrap_state_dict; "
            f"torch.save(unwrap_state_dict({load}), {json.dumps(str(out))})")
    return f"{shlex.quote(sys.executable)} -c {shlex.quote(code)}", out


def _load_file(path: Path) -> Any:
    try:
        # Official training checkpoints carry their argparse.Namespace under "args"; it is plain data,
        # so allow it rather than make users re-save. Anything else unusual is refused below.
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            # A plain pickle.dump file makes torch warn about its protocol before refusing it: the
            # refusal below says what matters, in one line.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # The weights-only unpickler refused something: say what, from the file itself (nothing ran).
        reason = str(exc)
        refused = _refused_globals(path, reason)
        code = [name for name in refused if _runs_code(name)]
        if code:
            raise PipelineError(
                f"checkpoint {path} holds code that would run when it is loaded ({', '.join(code)}); it was not "
                "loaded and should not be: take the weights from the model's publisher, or re-save them where "
                "the model was trained with torch.save(model.state_dict(), path)"
            ) from exc
        if not refused and pickle_globals(path) is None:
            raise PipelineError(
                f"{path} is not a PyTorch checkpoint ({type(exc).__name__}); pass a .pth/.pt file written by torch.save"
            ) from exc
        recipe, out = resave_recipe(path)
        if refused:
            what = (f"holds Python objects outside weights-only loading's allowed list ({', '.join(refused)}), "
                    "whose code would run when it is loaded")
        else:
            detail = next((line.strip() for line in reason.splitlines()[1:] if line.strip()
                           and not line.startswith(("Please file", "Check the documentation"))), reason)
            what = f"is a pickle that weights-only loading cannot read ({detail})"
        raise PipelineError(
            f"checkpoint {path} {what}; if you trust the file, re-save its weights with: {recipe} "
            f"-- then use {out}"
        ) from exc
    except Exception as exc:  # torch.load raises many types for a file that is no checkpoint (RuntimeError, KeyError...)
        raise PipelineError(
            f"{path} is not a PyTorch checkpoint ({type(exc).__name__}); pass a .pth/.pt file written by torch.save"
        ) from exc


def load_weights(
    model: nn.Module, path: str | os.PathLike[str], variant: str, reset_head: bool = False
) -> dict[str, Any]:
    """Load an official/timm/torchvision ConvNeXt checkpoint into `model` strictly.

    `variant` is the model's variant name, used to explain mismatches. With `reset_head`, the
    checkpoint's classifier is dropped and the model keeps its own freshly initialised head.
    Returns {"layout", "guessed_variant", "sha256", "path", "checkpoint_num_classes", "head_reset"}.
    """
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"checkpoint file not found: {path}; check the path")
    sha256 = _sha256(path)
    raw = _load_file(path)
    try:
        layout = detect_layout(raw)
        sd = to_official(raw)
    except PipelineError as exc:
        raise PipelineError(f"{path}: {exc}") from exc
    guessed = guess_variant(sd)

    own = model.state_dict()
    missing = [k for k in own if k not in sd and not (reset_head and k.startswith("head."))]
    unexpected = [k for k in sd if k not in own and not (reset_head and k.startswith("head."))]
    if missing or unexpected:
        first = []
        if missing:
            first.append(f"first missing: {missing[0]}")
        if unexpected:
            first.append(f"first unexpected: {unexpected[0]}")
        raise PipelineError(
            f"checkpoint has {len(missing)} missing and {len(unexpected)} unexpected keys "
            f"({', '.join(first)}); {_variant_hint(sd, guessed, variant, missing, unexpected)}"
        )

    stem_key = "downsample_layers.0.0.weight"
    for key, value in own.items():
        if key.startswith("head.") or key not in sd or sd[key].shape == value.shape:
            continue
        if key == stem_key and sd[key].shape[0] == value.shape[0]:
            continue  # only the input channels differ: reported below with its own fix
        raise PipelineError(
            f"checkpoint tensor '{key}' has shape {tuple(sd[key].shape)}, model expects {tuple(value.shape)}; "
            f"{_variant_hint(sd, guessed, variant)}"
        )
    if sd[stem_key].shape != own[stem_key].shape:
        ckpt_in, model_in = sd[stem_key].shape[1], own[stem_key].shape[1]
        raise PipelineError(
            f"checkpoint stem takes {ckpt_in} input channels, model expects {model_in}; pass --in-chans {ckpt_in}"
        )

    ckpt_classes = int(sd["head.weight"].shape[0]) if "head.weight" in sd else None
    if reset_head:
        # Keep the model's own head, so the load below stays strict about every other key.
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
        sd.update({k: v for k, v in own.items() if k.startswith("head.")})
    elif ckpt_classes != own["head.weight"].shape[0]:
        model_classes = own["head.weight"].shape[0]
        raise PipelineError(
            f"checkpoint head has {ckpt_classes} classes, model expects {model_classes}; "
            f"pass --num-classes {ckpt_classes}, or fine-tune it on your classes with "
            f"`pipeline train --init-weights {path} --reset-head`"
        )

    model.load_state_dict(sd, strict=True)
    return {
        "layout": layout,
        "guessed_variant": guessed,
        "sha256": sha256,
        "path": str(path),
        "checkpoint_num_classes": ckpt_classes,
        "head_reset": reset_head,
    }


def save_checkpoint(
    model: nn.Module,
    path: str | os.PathLike[str],
    variant: str,
    num_classes: int,
    in_chans: int,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write `{"model": state_dict, "variant", "num_classes", "in_chans", **extra}` atomically.

    The file is written next to `path` and renamed over it, so a crash never leaves a half-written
    checkpoint under the real name. `extra` values should be plain data (weights-only loadable).
    """
    path = Path(path)
    extra = dict(extra or {})
    clash = sorted(_RESERVED_KEYS & extra.keys())
    if clash:
        raise PipelineError(f"extra checkpoint fields {clash} collide with reserved keys; rename them")
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    head = sd.get("head.weight")
    if head is not None and head.shape[0] != num_classes:
        raise PipelineError(
            f"model head has {head.shape[0]} classes but num_classes={num_classes}; "
            f"pass --num-classes {head.shape[0]}"
        )
    stem = sd.get("downsample_layers.0.0.weight")
    if stem is not None and stem.shape[1] != in_chans:
        raise PipelineError(
            f"model stem takes {stem.shape[1]} channels but in_chans={in_chans}; pass --in-chans {stem.shape[1]}"
        )

    payload = {**extra, "model": sd, "variant": variant, "num_classes": num_classes, "in_chans": in_chans}
    atomic_torch_save(payload, path)
    return path


def atomic_torch_save(payload: Any, path: Path) -> None:
    """torch.save to a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            # mkstemp creates the file 0600; a checkpoint is not secret, make it readable like torch.save would.
            os.fchmod(f.fileno(), 0o644)
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


__all__ = [
    "detect_layout",
    "timm_key_to_official",
    "torchvision_key_to_official",
    "unwrap_state_dict",
    "to_official",
    "guess_variant",
    "load_weights",
    "save_checkpoint",
]


def load_model_from_checkpoint(path: str | os.PathLike[str]) -> nn.Module:
    """Rebuild a model from a checkpoint written by `save_checkpoint` (eval mode)."""
    from pipeline.model import create_model

    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"checkpoint file not found: {path}; run `pipeline build` first")
    raw = _load_file(path)
    if not isinstance(raw, dict) or not {"model", "variant", "num_classes", "in_chans"} <= set(raw):
        raise PipelineError(
            f"{path} was not written by `pipeline build` (no variant/num_classes/in_chans); "
            "pass it as --weights instead"
        )
    model = create_model(raw["variant"], num_classes=int(raw["num_classes"]), in_chans=int(raw["in_chans"]), seed=None)
    model.load_state_dict(raw["model"], strict=True)
    return model.eval()
