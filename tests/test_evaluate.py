"""The cheap frozen-encoder evaluations behind quality.py's probe and kNN columns."""

import torch
import torch.nn.functional as F

from maepl.evaluate import feature_probe, knn_accuracy


def blobs(n: int, dim: int, classes: int, spread: float, seed: int):
    """Labelled points around ``classes`` centres (the same centres for every ``seed``)."""
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(100))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    return centres[y] + spread * torch.randn(n, dim, generator=g), y


def test_knn_matches_a_brute_force_weighted_vote():
    train_f, train_y = blobs(300, 8, 5, 1.5, 0)
    test_f, test_y = blobs(120, 8, 5, 1.5, 1)
    k, t = 7, 0.07
    sim = F.normalize(test_f, dim=1) @ F.normalize(train_f, dim=1).t()
    correct = 0
    for i in range(len(test_f)):
        top = sim[i].argsort(descending=True)[:k]
        votes = torch.zeros(5)
        for j in top:  # each neighbour votes exp(similarity / t) for its class
            votes[train_y[j]] += torch.exp(sim[i, j] / t)
        correct += int(votes.argmax() == test_y[i])
    expected = 100.0 * correct / len(test_f)
    # a chunk smaller than the test set exercises the chunked loop
    assert knn_accuracy(train_f, train_y, test_f, test_y, k=k, temperature=t, chunk=50) == (
        expected
    )
    assert 20.0 < expected < 100.0  # neither chance nor trivially separable: the vote matters


def test_feature_probe_learns_and_is_repeatable_whatever_the_global_rng():
    train_f, train_y = blobs(2000, 32, 10, 2.0, 0)
    test_f, test_y = blobs(500, 32, 10, 2.0, 1)
    accs = []
    for global_seed in (1, 2):  # the caller's RNG state must not change the result
        torch.manual_seed(global_seed)
        accs.append(feature_probe(train_f, train_y, test_f, test_y, epochs=1, batch_size=256))
    assert accs[0] == accs[1]
    trained = feature_probe(train_f, train_y, test_f, test_y, epochs=30, batch_size=256)
    assert trained > 60.0 and trained > accs[0]  # chance is 10 %
    # and it leaves the caller's RNG where it was
    torch.manual_seed(3)
    before = torch.rand(3)
    torch.manual_seed(3)
    feature_probe(train_f, train_y, test_f, test_y, epochs=1, batch_size=256)
    assert torch.equal(torch.rand(3), before)
