from __future__ import annotations

import torch

from services.inference.decoding import sample_token


def test_temperature_zero_is_argmax():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert sample_token(logits, 0.0, 1.0, torch.Generator().manual_seed(0)) == 1


def test_top_p_keeps_only_the_nucleus():
    # Probabilities ~ [0.64, 0.24, 0.09, 0.03]: top_p=0.7 keeps the first two tokens only.
    logits = torch.log(torch.tensor([0.64, 0.24, 0.09, 0.03]))
    gen = torch.Generator().manual_seed(0)
    seen = {sample_token(logits, 1.0, 0.7, gen) for _ in range(500)}
    assert seen == {0, 1}


def test_sampling_follows_the_distribution_and_the_seed():
    logits = torch.log(torch.tensor([0.5, 0.5]))
    draws = [sample_token(logits, 1.0, 1.0, torch.Generator().manual_seed(s)) for s in range(400)]
    assert 150 < sum(draws) < 250
    again = [sample_token(logits, 1.0, 1.0, torch.Generator().manual_seed(s)) for s in range(400)]
    assert draws == again
