"""LoRA adapters on a decoder backbone (peft): injection, merged weights, and saving a plain Hugging Face model.

- ``add_lora(backbone, config)``: adapters on ``config.lora_target_modules`` (rank ``lora_rank``, ``lora_alpha``,
  rsLoRA scaling with ``use_rslora``); afterwards only the adapters require grad.
- ``merged_state_dict(backbone)``: the weights with the adapters merged (``W + scale · B A``), original key names.
- ``save_backbone(backbone, path)``: ``save_pretrained`` (safetensors) of the merged weights, so a run directory holds
  a plain Hugging Face model that ``xmctag export`` (and anything else) loads without peft.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from xmctag.config import Config
from xmctag.errors import UserError


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
