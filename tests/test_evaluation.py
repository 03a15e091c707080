import math

import torch
import torch.nn.functional as F

from compressor.evaluation import WindowPerplexity, perplexity
from conftest import tiny_llama


def test_window_perplexity_is_exp_of_mean_next_token_cross_entropy():
    torch.manual_seed(0)
    logits, ids = torch.randn(3, 10, 7), torch.randint(0, 7, (3, 10))
    metric = WindowPerplexity()
    metric.update(logits[:2], ids[:2])
    metric.update(logits[2:], ids[2:])
    expected = math.exp(F.cross_entropy(logits[:, :-1].reshape(-1, 7), ids[:, 1:].reshape(-1)).item())
    assert math.isclose(metric.compute().item(), expected, rel_tol=1e-6)


def test_perplexity_of_a_model_matches_its_loss():
    model = tiny_llama()
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert math.isclose(perplexity(model, ids, "cpu", batch_size=2, progress=False), math.exp(loss), rel_tol=1e-5)
