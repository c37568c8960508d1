"""Decoder LLMs as the dual encoder (ViXML's dual-decoder variant): detection, LoRA, and saving merged weights.

- ``is_decoder_config``: a Hugging Face config in -> whether the backbone is a causal LM (Qwen2, Llama, Mistral, ...).
- ``resolve_kind_defaults``: a ``Config`` in -> the same with ``loss`` / ``centering`` "auto" replaced by what suits
  the backbone's kind (decoders: InfoNCE on centred embeddings; encoders: the triplet loss, no centring).
- ``prepare_model``: ``(tokenizer, backbone, Config, device)`` in -> ``(tokenizer, TextEncoder)`` ready to train.
  Encoders come back as before (full fine-tuning). Decoders get their prompt tokenizer (``xmctag.models.prompt``),
  LoRA adapters through peft (only the adapters train; ``lora_rank = 0`` fine-tunes everything instead) and
  gradient checkpointing on every device: activations are what fills memory with 30-layer models and batches of 128
  pairs (SmolLM2 at the defaults, EURLEX titles, without it: past 23 GB of RAM on CPU, killed before its first step).
- ``save_backbone``: writes the backbone with the LoRA adapters merged into its weights, so a run directory holds a
  plain Hugging Face model that ``xmctag export`` (and anything else) loads without peft.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import torch

from xmctag.config import Config
from xmctag.errors import UserError

# model_type values of causal LMs whose base model takes input_ids / inputs_embeds, attention_mask and position_ids.
DECODER_MODEL_TYPES = {
    "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "llama", "mistral", "mixtral", "gemma", "gemma2", "gemma3_text",
    "phi3", "olmo", "olmo2", "granite", "smollm3", "starcoder2", "stablelm", "cohere", "glm",
}


def is_decoder_config(model_config) -> bool:
    """A causal LM backbone: known ``model_type``, a ``*ForCausalLM`` architecture, or ``is_decoder`` set."""
    if getattr(model_config, "model_type", None) in DECODER_MODEL_TYPES:
        return True
    if any(str(a).endswith("ForCausalLM") for a in (getattr(model_config, "architectures", None) or [])):
        return True
    return bool(getattr(model_config, "is_decoder", False))


def resolve_kind_defaults(config: Config, model_config=None) -> Config:
    """``config`` with ``loss`` and ``centering`` "auto" resolved for its encoder's kind (saved as resolved).

    Why decoders differ: untrained, a decoder's mean-pooled embeddings share one dominant direction (SmolLM2: mean
    pairwise cosine 0.945), and the triplet loss then shrinks every score gap toward its collapse value instead of
    separating; centring removes the shared direction and InfoNCE's softmax keeps pushing all negatives away. On
    full EURLEX titles (H100, 2 epochs, bench/RESULTS.md) SmolLM2 with both and the rank-64 LoRA defaults reached
    dev P@1 76.7 (MiniLM 75.4); every triplet-loss run, rank 16 or full fine-tuning, stayed at 2-5 %.
    ``model_config``: the backbone's Hugging Face config when at hand (else read from ``config.encoder``).
    """
    if config.loss != "auto" and config.centering != "auto":
        return config
    if model_config is None:
        from xmctag.models.registry import load_model_config

        model_config = load_model_config(config.encoder)
    decoder = is_decoder_config(model_config)
    return dataclasses.replace(
        config,
        loss=("infonce" if decoder else "triplet") if config.loss == "auto" else config.loss,
        centering=("ema" if decoder else "none") if config.centering == "auto" else config.centering)


def uses_lora(encoder, config: Config) -> bool:
    return encoder.is_decoder and config.lora_rank > 0


def learning_rate(encoder, config: Config) -> float:
    """``lora_lr`` when LoRA adapters are what trains, else ``lr`` (full fine-tuning)."""
    return config.lora_lr if uses_lora(encoder, config) else config.lr


def prepare_model(tokenizer, backbone, config: Config, device: torch.device, vision_dim: int | None = None):
    """``(tokenizer, encoder)`` on ``device``, set up for training as described in the module docstring.

    ``vision_dim``: image fusion on; the encoder is a ``FusedEncoder`` with a fresh projection from that width.
    """
    from xmctag.models.fusion import make_encoder
    from xmctag.models.prompt import prompt_tokenizer

    config = resolve_kind_defaults(config, backbone.config)
    encoder = make_encoder(backbone, vision_dim, pooling=config.pooling, centering=config.centering == "ema",
                           center_momentum=config.center_momentum)
    if not encoder.is_decoder:
        return tokenizer, encoder.to(device)
    tokenizer = prompt_tokenizer(tokenizer, backbone.config, config)
    if config.lora_rank > 0:
        add_lora(backbone, config)  # touches the backbone only: an image projection stays trainable
    if config.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen embeddings (no inputs that require grad needed).
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return tokenizer, encoder.to(device)


def add_lora(backbone: torch.nn.Module, config: Config) -> None:
    """Injects LoRA adapters into ``backbone`` in place; afterwards only the adapters require grad."""
    from peft import LoraConfig, inject_adapter_in_model

    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(config.lora_target_modules), use_rslora=config.use_rslora, bias="none")
    try:
        inject_adapter_in_model(lora, backbone)
    except ValueError as e:  # peft: none of the target modules exist in this model
        raise UserError(f"lora_target_modules {','.join(config.lora_target_modules)}: {e}") from None
    for name, param in backbone.named_parameters():
        param.requires_grad_("lora_" in name)
    # The default names are Llama/Qwen/Mistral's; another architecture may match only some (phi3: o_proj and
    # down_proj, not its fused qkv_proj / gate_up_proj). Say so rather than train fewer adapters silently.
    adapted = {name.rsplit(".", 1)[-1] for name, module in backbone.named_modules() if hasattr(module, "lora_A")}
    unmatched = [m for m in config.lora_target_modules if m not in adapted]
    if unmatched:
        warnings.warn(f"lora_target_modules {','.join(unmatched)} match no module of this model; LoRA adapters on "
                      f"{','.join(sorted(adapted))} only", stacklevel=2)


def merged_state_dict(backbone: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's state dict with LoRA adapters merged (``W + scale · B A``) under the original key names.

    Computed out of place: the training model keeps its unmerged weights and adapters (merging and unmerging in
    place would drift the frozen weights by rounding, once per saved epoch).
    """
    from peft.tuners.lora import LoraLayer

    merged = {}
    for name, module in backbone.named_modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            weight = base.weight.detach()
            for adapter in module.active_adapters:
                weight = weight + module.get_delta_weight(adapter).detach().to(weight.dtype)
            merged[f"{name}.weight"] = weight
    state = {}
    for key, tensor in backbone.state_dict().items():
        if ".lora_" in key:
            continue
        key = key.replace(".base_layer.", ".")
        state[key] = merged.get(key, tensor).detach().contiguous()
    return state


def has_lora(backbone: torch.nn.Module) -> bool:
    return any("lora_" in name for name, _ in backbone.named_parameters())


def save_backbone(backbone: torch.nn.Module, path: Path) -> None:
    """``save_pretrained`` (safetensors), with LoRA adapters merged into the weights when there are any."""
    if not has_lora(backbone):
        backbone.save_pretrained(path, safe_serialization=True)
        return
    state = {k: v.cpu() for k, v in merged_state_dict(backbone).items()}
    backbone.save_pretrained(path, safe_serialization=True, state_dict=state)
