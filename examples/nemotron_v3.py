"""Nemotron V3 reference model: forward, LM loss, greedy decoding with the Mamba2 / KV caches, then
dsgraph's rewrites.

    python examples/nemotron_v3.py
"""
import torch

import dsgraph
from dsgraph.models import NemotronV3Config, NemotronV3ForCausalLM

torch.manual_seed(0)
config = NemotronV3Config.tiny()  # pattern "M*-EM": Mamba2, attention, MLP, MoE, Mamba2
model = NemotronV3ForCausalLM(config).eval()
ids = torch.randint(0, config.vocab_size, (2, 32))

out = model(ids, labels=ids)
print(f"blocks {config.hybrid_override_pattern}  logits {tuple(out.logits.shape)}  LM loss {out.loss.item():.4f}")
print("greedy:", model.generate(ids[:1, :8], max_new_tokens=8)[0].tolist())

opt = dsgraph.optimize(model)
with torch.no_grad():
    error = (opt(ids).logits - model(ids).logits).abs().max().item()
print(dsgraph.explain(opt))
print(f"max |logits - eager logits| = {error:.2e}")
