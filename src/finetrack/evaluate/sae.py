"""The `sae` suite: a sparse autoencoder (SAE) trained on one layer of the base model, read on each checkpoint. Which
of its features' mean activation over the probe prompts moved most since the base model, and how well it still
reconstructs the checkpoint's hidden states (a large error: the SAE no longer describes the layer).

    change          mean over the probes' tokens of a feature's activation, checkpoint minus base model
    max_change      the largest |change| over the features; mean_abs_change: the mean of |change|
    num_changed     features whose |change| exceeds min_change
    reconstruction  sqrt(sum ||x - x_hat||^2 / sum ||x||^2) over the checkpoint's tokens (x_hat: decode(encode(x)))

The SAE, as sae-lens writes it (SAE.save_model; keys read from sae_lens/saes/sae.py, standard_sae.py,
jumprelu_sae.py, topk_sae.py and loading/pretrained_sae_loaders.py of jbloomAus/SAELens):
- a folder with cfg.json (d_in, d_sae, architecture standard / jumprelu / topk with k, apply_b_dec_to_input,
  normalize_activations, the hook in metadata.hook_name, top-level hook_name / hook_point before sae-lens 6, and
  activation_fn / activation_fn_str with activation_fn_kwargs.k) and sae_weights.safetensors with W_enc (d_in,
  d_sae), W_dec (d_sae, d_in), b_enc (d_sae), b_dec (d_in), and threshold (d_sae) for JumpReLU;
- or one .safetensors file with those tensors and no config: ReLU, or JumpReLU when it holds threshold, b_dec not
  subtracted from the input (the plain rule, as Gemma Scope's parameters); its layer is the suite's `layer`.

    features = act((x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc)        x_hat = features @ W_dec + b_dec
    act: relu; jumprelu: relu(pre) where pre > threshold, else 0; topk: the k largest pre, relu'd, others 0

Layer N is the output of decoder block N, sae-lens' blocks.N.hook_resid_post (= blocks.N+1.hook_resid_pre).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ..config import Config
from .activations import Reference, Text, check_layers, decoder_layers, probe_texts, read
from .spec import EvalError, SaeSuite

log = logging.getLogger("finetrack")

CONFIG = "cfg.json"
WEIGHTS = "sae_weights.safetensors"
ACTIVATIONS = ("relu", "jumprelu", "topk")
# sae-lens' normalize_activations values this module applies at run time; expected_average_only_in needs a scaling
# factor kept outside the SAE (sae-lens folds it into the weights at the end of training and writes "none")
NORMALIZATIONS = ("none", "constant_norm_rescale", "layer_norm")
_HOOK = re.compile(r"blocks\.(\d+)\.hook_resid_(post|pre)")
_SUPPORTED = "the sae suite reads standard (relu), jumprelu and topk SAEs"


@dataclass
class Sae:
    """An SAE's weights (float32) and how it encodes; `source` is the file or folder it was read from."""

    W_enc: torch.Tensor  # (d_in, d_sae)  (sae-lens names)
    W_dec: torch.Tensor  # (d_sae, d_in)
    b_enc: torch.Tensor  # (d_sae,)
    b_dec: torch.Tensor  # (d_in,)
    layer: int
    activation: str = "relu"  # one of ACTIVATIONS
    threshold: torch.Tensor | None = None  # (d_sae,) jumprelu
    k: int | None = None  # topk: active features per token
    apply_b_dec_to_input: bool = False
    normalize_activations: str = "none"  # one of NORMALIZATIONS
    source: Path = Path()

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    def to(self, device: torch.device | str) -> Sae:
        """The same SAE with its tensors on `device`."""
        moved = {k: getattr(self, k).to(device) for k in ("W_enc", "W_dec", "b_enc", "b_dec")}
        threshold = None if self.threshold is None else self.threshold.to(device)
        return replace(self, threshold=threshold, **moved)


# ------------------------------------------------------------------------------------------------- reading
def load_sae(path: Path, layer: int | None) -> Sae:
    """The SAE at `path`: a sae-lens folder (or its sae_weights.safetensors, cfg.json beside it) or a bare
    .safetensors file. `layer`: the decoder layer it encodes (the suite's layer); None takes the cfg.json hook_name,
    and a bare file needs it. Errors (EvalError) name the file and what to do."""
    path = Path(path)
    if path.is_dir():
        return _load_folder(path, layer)
    if path.is_file() and path.name == WEIGHTS and (path.parent / CONFIG).is_file():
        return _load_folder(path.parent, layer)  # its cfg.json says how it encodes
    if path.is_file():
        if path.suffix != ".safetensors":
            raise EvalError(f"{path}: not a .safetensors file; path is a sae-lens folder ({CONFIG} + {WEIGHTS}) or a .safetensors file")
        if layer is None:
            raise EvalError(f"{path}: a bare .safetensors SAE does not say which layer it encodes; set the suite's layer")
        tensors = _read_tensors(path)
        activation = "jumprelu" if "threshold" in tensors or "log_threshold" in tensors else "relu"
        return _build(tensors, path, layer, activation, None, apply_b_dec_to_input=False, normalize="none")
    raise EvalError(
        f"{path}: SAE not found; set path to a sae-lens folder ({CONFIG} + {WEIGHTS}) or a .safetensors file with W_enc, "
        "W_dec, b_enc, b_dec"
    )


def _load_folder(folder: Path, layer: int | None) -> Sae:
    """A sae-lens folder: cfg.json says how the weights encode (sae-lens 6, and the keys earlier versions wrote)."""
    cfg_path = folder / CONFIG
    for f in (cfg_path, folder / WEIGHTS):
        if not f.is_file():
            raise EvalError(f"{folder}: no {f.name}; a sae-lens SAE folder holds {CONFIG} and {WEIGHTS} (SAE.save_model writes them)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EvalError(f"{cfg_path}: unreadable ({e}); write it again with sae-lens (SAE.save_model)") from None
    if not isinstance(cfg, dict):
        raise EvalError(f"{cfg_path}: holds a {type(cfg).__name__}, not an object of SAE settings")
    activation, k = _activation(cfg, cfg_path)
    normalize = cfg.get("normalize_activations")
    if normalize is None or isinstance(normalize, bool):  # a bool before sae-lens 6
        normalize = "expected_average_only_in" if normalize else "none"
    if normalize not in NORMALIZATIONS:
        raise EvalError(
            f"{cfg_path}: normalize_activations {normalize!r} is not supported ({', '.join(NORMALIZATIONS)} are); for "
            "expected_average_only_in fold the scaling factor into the weights (sae-lens: fold_activation_norm_scaling_factor) "
            "and save the SAE again"
        )
    if cfg.get("reshape_activations") not in (None, "none"):
        raise EvalError(
            f"{cfg_path}: reshape_activations {cfg['reshape_activations']!r} (attention heads); {_SUPPORTED} of the residual stream"
        )
    if cfg.get("rescale_acts_by_decoder_norm"):
        raise EvalError(
            f"{cfg_path}: rescale_acts_by_decoder_norm is not supported; fold the decoder norms into the encoder and save again"
        )
    metadata = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    hook = metadata.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")  # sae-lens 6, then earlier
    tensors = _read_tensors(folder / WEIGHTS)
    apply_b_dec = cfg.get("apply_b_dec_to_input", True)  # sae-lens' default
    sae = _build(tensors, folder / WEIGHTS, _layer(hook, layer, cfg_path), activation, k, bool(apply_b_dec), normalize)
    for name, size in (("d_in", sae.d_in), ("d_sae", sae.d_sae)):
        if name in cfg and cfg[name] != size:
            raise EvalError(f"{folder}: {CONFIG} says {name} {cfg[name]} but {WEIGHTS} holds {size}; the two files do not belong together")
    return sae


def _activation(cfg: dict, where: Path) -> tuple[str, int | None]:
    """(activation, k) from cfg.json's architecture and activation_fn (activation_fn_str, with
    activation_fn_kwargs.k, before sae-lens 6)."""
    architecture = cfg.get("architecture", "standard")
    name = cfg.get("activation_fn", cfg.get("activation_fn_str"))
    if architecture == "standard":
        activation = name or "relu"
    elif architecture in ("jumprelu", "topk"):
        activation = architecture
    else:
        raise EvalError(f"{where}: architecture {architecture!r} is not supported; {_SUPPORTED}")
    if activation not in ACTIVATIONS:
        raise EvalError(f"{where}: activation_fn {name!r} is not supported; {_SUPPORTED}")
    if activation != "topk":
        return activation, None
    kwargs = cfg.get("activation_fn_kwargs") if isinstance(cfg.get("activation_fn_kwargs"), dict) else {}
    k = cfg.get("k", kwargs.get("k"))
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise EvalError(f"{where}: a topk SAE needs k (a positive integer, the active features per token); got {k!r}")
    return activation, k


def _layer(hook: str | None, layer: int | None, where: Path) -> int:
    """The decoder layer a sae-lens SAE encodes: the suite's `layer`, which must agree with the hook_name if any."""
    if hook is None:
        if layer is None:
            raise EvalError(f"{where}: no hook_name, so the layer the SAE encodes is unknown; set the suite's layer")
        return layer
    m = _HOOK.fullmatch(str(hook))
    if m is None:
        raise EvalError(
            f"{where}: hook_name {hook!r} is not the residual stream after a block (blocks.N.hook_resid_post); the sae "
            "suite reads decoder layer outputs"
        )
    found = int(m[1]) if m[2] == "post" else int(m[1]) - 1  # the input of block N is the output of block N-1
    if found < 0:
        raise EvalError(f"{where}: hook_name {hook!r} is the embeddings, not a decoder layer's output; the sae suite reads layer outputs")
    if layer is not None and layer != found:
        raise EvalError(f"{where}: hook_name {hook!r} is layer {found} but the suite's layer is {layer}; fix or remove the suite's layer")
    return found


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, as float32."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise EvalError(f"{path}: unreadable ({e}); an SAE file is safetensors with W_enc, W_dec, b_enc, b_dec") from None
    return {name: t.float() for name, t in tensors.items()}


def _build(
    tensors: dict[str, torch.Tensor],
    where: Path,
    layer: int,
    activation: str,
    k: int | None,
    apply_b_dec_to_input: bool,
    normalize: str,
) -> Sae:
    """An Sae from its tensors, every shape checked against W_enc's (d_in, d_sae)."""
    if "threshold" not in tensors and "log_threshold" in tensors:  # a JumpReLU training state (sae-lens saves threshold)
        tensors = {**tensors, "threshold": tensors["log_threshold"].exp()}
    needed = ["W_enc", "W_dec", "b_enc", "b_dec"] + (["threshold"] if activation == "jumprelu" else [])
    missing = [n for n in needed if n not in tensors]
    if missing:
        raise EvalError(f"{where}: no tensor(s) {missing} (it holds {sorted(tensors)[:8]}); a {activation} SAE needs {needed}")
    w_enc = tensors["W_enc"]
    if w_enc.ndim != 2:
        raise EvalError(f"{where}: W_enc has shape {tuple(w_enc.shape)}; it is a matrix (d_in, d_sae)")
    d_in, d_sae = w_enc.shape
    shapes = {"W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,), "threshold": (d_sae,)}
    for name, shape in shapes.items():
        if name in needed and tuple(tensors[name].shape) != shape:
            raise EvalError(
                f"{where}: {name} has shape {tuple(tensors[name].shape)}, but W_enc {(d_in, d_sae)} (d_in, d_sae) needs {shape}; "
                "the tensors do not belong to one SAE"
            )
    if k is not None and k > d_sae:
        raise EvalError(f"{where}: k {k} exceeds the SAE's {d_sae} features")
    return Sae(
        W_enc=w_enc,
        W_dec=tensors["W_dec"],
        b_enc=tensors["b_enc"],
        b_dec=tensors["b_dec"],
        layer=layer,
        activation=activation,
        threshold=tensors["threshold"] if activation == "jumprelu" else None,
        k=k,
        apply_b_dec_to_input=apply_b_dec_to_input,
        normalize_activations=normalize,
        source=Path(where),
    )


# ------------------------------------------------------------------------------------------------- the math
def encode(sae: Sae, x: torch.Tensor) -> torch.Tensor:
    """Feature activations of hidden states x: (..., d_in) -> (..., d_sae)."""
    return _features(sae, _normalize(sae, x)[0])


def encode_decode(sae: Sae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (..., d_sae), reconstruction of x (..., d_in)) of hidden states x (..., d_in)."""
    normalized, undo = _normalize(sae, x)
    features = _features(sae, normalized)
    return features, undo(features @ sae.W_dec + sae.b_dec)


def _features(sae: Sae, x: torch.Tensor) -> torch.Tensor:
    """act((x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc) on (normalized) hidden states."""
    if sae.apply_b_dec_to_input:
        x = x - sae.b_dec
    pre = x @ sae.W_enc + sae.b_enc  # (..., d_sae)
    if sae.activation == "relu":
        return pre.relu()
    if sae.activation == "jumprelu":
        return pre.relu() * (pre > sae.threshold)
    values, indices = pre.topk(sae.k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter(-1, indices, values.relu())


def _normalize(sae: Sae, x: torch.Tensor) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """sae-lens' run-time normalization of the SAE's input, and the map that undoes it on the reconstruction."""
    if sae.normalize_activations == "constant_norm_rescale":  # every token scaled to norm sqrt(d_in)
        norm = x.norm(dim=-1, keepdim=True)
        scale = math.sqrt(sae.d_in) / torch.where(norm > 0, norm, 1.0)
        return x * scale, lambda y: y / scale
    if sae.normalize_activations == "layer_norm":  # zero mean, unit (unbiased) standard deviation per token
        mean = x.mean(-1, keepdim=True)
        std = (x - mean).std(-1, keepdim=True)
        return (x - mean) / (std + 1e-5), lambda y: y * std + mean
    return x, lambda y: y


# ------------------------------------------------------------------------------------------------- the suite
@dataclass
class FeatureMeans:
    """One model's SAE features on the probes: the mean activation per feature over every token, and the
    reconstruction error (relative L2, all tokens together)."""

    mean: torch.Tensor  # (d_sae,) float64
    tokens: int
    reconstruction: float | None


def run(suite: SaeSuite, model: nn.Module, tokenizer, cfg: Config, reference: Reference) -> dict:
    """The suite's result at one step (metrics, counts, and the top features under "features")."""
    sae = suite_sae(suite, model)
    texts = probe_texts(suite, cfg, tokenizer)
    log.info("sae suite '%s': %d features at layer %d (%s), %d probes", suite.name, sae.d_sae, sae.layer, sae.activation, len(texts))
    sae = sae.to(next(model.parameters()).device)  # encoded where the model runs: a large SAE is slow on CPU
    now = feature_means(sae, model, tokenizer, texts, suite.micro_batch_size)
    key = ("sae", suite.name)
    if reference.folder is None:  # step 0 is the base model: the very same numbers, every change exactly 0
        reference.cache.setdefault(key, now)
        then = now
    else:
        if key not in reference.cache:  # the base model's side once per eval session
            with reference.base() as base:
                reference.cache[key] = feature_means(sae, base, tokenizer, texts, suite.micro_batch_size)
        then = reference.cache[key]
    change = now.mean - then.mean
    size = change.abs()
    top = torch.argsort(size, descending=True, stable=True)[: suite.num_features]  # ties: the lower feature id first
    metrics = {
        "max_change": float(size.max()),
        "mean_abs_change": float(size.mean()),
        "num_changed": int((size > suite.min_change).sum()),
        "reconstruction": now.reconstruction,
    }
    counts = {"prompts": len(texts), "tokens": now.tokens, "features": sae.d_sae}
    features = {
        "feature": top.tolist(),
        "base": then.mean[top].tolist(),
        "checkpoint": now.mean[top].tolist(),
        "change": change[top].tolist(),
    }
    return {"metrics": metrics, "counts": counts, "features": features}


def suite_sae(suite: SaeSuite, model: nn.Module) -> Sae:
    """The suite's SAE, checked against the model: its layer exists, its d_in is the model's hidden size."""
    try:
        sae = load_sae(Path(suite.path), suite.layer)
    except EvalError as e:
        raise EvalError(f"eval suite '{suite.name}': {e}") from None
    check_layers([sae.layer], len(decoder_layers(model)), suite.name)
    hidden_size = model.config.hidden_size
    if sae.d_in != hidden_size:
        raise EvalError(
            f"eval suite '{suite.name}': {sae.source}: the SAE reads {sae.d_in}-dim activations but the model's hidden size is "
            f"{hidden_size}; use an SAE trained on this model"
        )
    return sae


@torch.no_grad()
def feature_means(sae: Sae, model: nn.Module, tokenizer, texts: list[Text], micro_batch_size: int) -> FeatureMeans:
    """Mean feature activations of `model` over every token `texts` average but the first (a probe: all of its tokens), summed
    micro-batch by micro-batch (nothing else kept), and the reconstruction error over the same tokens."""
    device = sae.W_enc.device
    total = torch.zeros(sae.d_sae, dtype=torch.float64, device=device)
    tokens, error_sq, norm_sq = 0, 0.0, 0.0
    for batch in read(model, tokenizer, texts, [sae.layer], micro_batch_size):
        # every token but each text's first: that position carries outsized activations (an attention sink) and SAEs
        # are usually trained without it; its norm would dominate the means and the reconstruction error
        span = batch.span.clone()
        span[:, 0] &= span.sum(1) == 1
        x = batch.hidden[sae.layer][span].to(device)  # (N, d_in): the tokens of the micro-batch, padding left out
        features, reconstruction = encode_decode(sae, x)
        total += features.sum(0, dtype=torch.float64)
        tokens += x.shape[0]
        error_sq += float((x - reconstruction).double().pow(2).sum())
        norm_sq += float(x.double().pow(2).sum())
    return FeatureMeans(total.cpu() / max(tokens, 1), tokens, math.sqrt(error_sq / norm_sq) if norm_sq > 0 else None)
