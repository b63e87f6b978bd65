"""DeepSeek V4 reference model: forward and LM loss on the tiny preset (a sliding, a ratio-4
compressed + indexer and a ratio-128 compressed layer), then dsgraph's rewrites.

    python examples/deepseek_v4.py
"""
import torch

import dsgraph
from dsgraph.models import DeepseekV4Config, DeepseekV4ForCausalLM

torch.manual_seed(0)
# Few experts: each expert's token count is a new shape, so a new graph to compile.
config = DeepseekV4Config.tiny(n_routed_experts=2, num_experts_per_tok=1)
model = DeepseekV4ForCausalLM(config).eval()
ids = torch.randint(0, config.vocab_size, (1, 128))  # 128 tokens: 1 pooled key on the ratio-128 layer

out = model(ids, labels=ids)
print(f"layers {config.layer_types}")
print(f"logits {tuple(out.logits.shape)}  LM loss {out.loss.item():.4f}")

opt = dsgraph.optimize(model)
with torch.no_grad():
    error = (opt(ids).logits - model(ids).logits).abs().max().item()
print(dsgraph.explain(opt))
print(f"max |logits - eager logits| = {error:.2e}")
