"""DeepSeek V3.2 reference model: forward, LM loss, indexer KL loss, then dsgraph's rewrites.

    python examples/deepseek_v32.py
"""
import torch

import dsgraph
from dsgraph.models import DeepseekV32Config, DeepseekV32ForCausalLM, compute_indexer_kl_loss

torch.manual_seed(0)
config = DeepseekV32Config.tiny(index_topk=8)
model = DeepseekV32ForCausalLM(config).eval()
ids = torch.randint(0, config.vocab_size, (2, 32))

out = model(ids, labels=ids, output_indexer_scores=True, output_indexer_kl_target=True)
kl = compute_indexer_kl_loss(out.indexer_scores, out.indexer_kl_targets)
print(f"logits {tuple(out.logits.shape)}  LM loss {out.loss.item():.4f}  indexer KL loss {kl.item():.4f}")
print("greedy:", model.generate(ids[:1, :8], max_new_tokens=8)[0].tolist())

opt = dsgraph.optimize(model)
with torch.no_grad():
    error = (opt(ids).logits - model(ids).logits).abs().max().item()
print(dsgraph.explain(opt))
print(f"max |logits - eager logits| = {error:.2e}")
