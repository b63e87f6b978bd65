"""Plain-eager reference models (torch + safetensors only; never imports dsgraph)."""
from .common import CheckpointError
from .deepseek_v32 import (DeepseekV32CausalLMOutput, DeepseekV32Config, DeepseekV32ForCausalLM, MLACache,
                           compute_indexer_kl_loss, hadamard_transform_torch, mla_attention, mla_attention_absorbed)

__all__ = ["CheckpointError", "DeepseekV32CausalLMOutput", "DeepseekV32Config", "DeepseekV32ForCausalLM", "MLACache",
           "compute_indexer_kl_loss", "hadamard_transform_torch", "mla_attention", "mla_attention_absorbed"]
