"""Facts about a Hugging Face backbone that every other models/ module needs, from its config alone.

``is_decoder_config``: whether a backbone is a causal LM (Qwen2, Llama, Mistral, ...), read by the dual decoder's
prompt, pooling, LoRA and export paths. This module imports nothing from ``xmctag.models``, so that the models
package has no import cycle: backbone <- encoder <- fusion <- build.
"""

from __future__ import annotations

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
