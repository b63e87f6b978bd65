"""Plain-eager reference models (torch + safetensors only; never imports dsgraph)."""
from .common import CheckpointError
from .deepseek_v32 import (DeepseekV32CausalLMOutput, DeepseekV32Config, DeepseekV32ForCausalLM, MLACache,
                           compute_indexer_kl_loss, hadamard_transform_torch, mla_attention, mla_attention_absorbed)
from .deepseek_v4 import (DeepseekV4CausalLMOutput, DeepseekV4Config, DeepseekV4ForCausalLM, hc_split_sinkhorn,
                          load_released_safetensors, overlap_transform, sink_attention, sinkhorn_normalize)
from .nemotron_v3 import (NemotronV3Cache, NemotronV3CausalLMOutput, NemotronV3Config, NemotronV3ForCausalLM,
                          mamba_kernels, ssd_chunked, ssd_naive, ssd_step)

__all__ = ["CheckpointError",
           "DeepseekV32CausalLMOutput", "DeepseekV32Config", "DeepseekV32ForCausalLM", "MLACache",
           "compute_indexer_kl_loss", "hadamard_transform_torch", "mla_attention", "mla_attention_absorbed",
           "DeepseekV4CausalLMOutput", "DeepseekV4Config", "DeepseekV4ForCausalLM", "hc_split_sinkhorn",
           "load_released_safetensors", "overlap_transform", "sink_attention", "sinkhorn_normalize",
           "NemotronV3Cache", "NemotronV3CausalLMOutput", "NemotronV3Config", "NemotronV3ForCausalLM",
           "mamba_kernels", "ssd_chunked", "ssd_naive", "ssd_step"]
