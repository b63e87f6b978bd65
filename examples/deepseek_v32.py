"""DeepSeek V3.2 reference model: forward, LM loss, indexer KL loss, then dsgraph's rewrites.

    python examples/deepseek_v32.py
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from models import DeepseekV32Config, DeepseekV32ForCausalLM, compute_indexer_kl_loss  # noqa: E402

torch.manual_seed(0)
config = DeepseekV32Config.tiny(index_topk=8)
model = DeepseekV32ForCausalLM(config).eval()
ids = torch.randint(0, config.vocab_size, (2, 32))

out = model(ids, labels=ids, output_indexer_scores=True, output_indexer_kl_target=True)
kl = compute_indexer_kl_loss(out.indexer_scores, out.indexer_kl_targets)
print(f"logits {tuple(out.logits.shape)}  LM loss {out.loss.item():.4f}  indexer KL loss {kl.item():.4f}")
print("greedy:", model.generate(ids[:1, :8], max_new_tokens=8)[0].tolist())

import dsgraph  # noqa: E402

opt = dsgraph.optimize(model)
with torch.no_grad():
    torch.testing.assert_close(opt(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
print(dsgraph.explain(opt))
