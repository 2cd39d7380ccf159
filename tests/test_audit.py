"""Is the real DP-SGD step private? One-run audits (Steinke, Nasr, Jagielski 2023, "Privacy
auditing with one (1) training run") of the functions a training run calls: 02's and 04's
`dp_sgd_step`, `poisson_sample` and `secret_generator`, not a copy of them.

M canaries, each in the training set with probability 1/2. Canary i is the one-hot input e_i of
a bias-free linear layer w -> w . x with loss -G w . x: its per-example gradient is the Dirac
-G e_i, of norm G = 100 C >= C, on a coordinate no other example touches. After STEPS steps of
SGD (lr 1) from w = 0, w_i = (C * #times sampled * [i in] + noise) / (qN): the score of canary i
is the released parameter w_i (for the seed-known attack, w_i minus the replayed noise).
We guess "in" for the K top and "out" for the K bottom scores (K fixed in advance) and turn the
number of right guesses into a lower bound eps_LB (03's `audit_one_run`).

Determinism. Every draw is seeded, so a run's verdict never changes: the canaries' inclusion
and the audit's tie-breaking come from numpy's generator of AUDIT_SEED, and the mechanism's own
noise and Poisson sampling from secret_generator(insecure_seed=MECHANISM_SEED), the insecure
path that a test may take (the adversary replays KNOWN_SEED, not this one). The seeds were not
chosen to pass: a correct mechanism that is (eps, delta)-DP gives eps_LB > eps with probability
at most the significance ALPHA = 1e-3 over the draws (Steinke et al. 2023, their theorem for
approximate DP), so most seeds pass the `<= claimed` assertions; the broken mechanisms (noise
/ 10, clipping skipped, a seed the adversary knows) give eps_LB near the largest value this
audit can show, 3.57 for K = 250 and ALPHA = 1e-3, far above the claim of 1.5.
"""
import numpy as np
import pytest
import torch

M, K, Q, STEPS, C, G = 1000, 250, 0.1, 200, 1.0, 100.0
EPS, DELTA, ALPHA = 1.5, 1e-5, 1e-3  # the claimed guarantee; the audit's significance
KNOWN_SEED = 1234  # the seed the replaying adversary knows
AUDIT_SEED, MECHANISM_SEED = 2023, 5  # fixed: the same verdict on every run (module docstring)


def canary_loss(model, x):
    """Per-example loss -G w . x: the gradient of one-hot example e_i is -G e_i (norm G)."""
    return -G * model(x)[:, 0]


def train_on_canaries(script, data, noise_multiplier, generator):
    """STEPS steps of DP-SGD (SGD, lr 1, from w = 0) through the script's own functions."""
    model = torch.nn.Linear(M, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    for _ in range(STEPS):
        batch = data[script.poisson_sample(len(data), Q, generator)]
        script.dp_sgd_step(model, optimizer, canary_loss, batch, C=C,
                           noise_multiplier=noise_multiplier, expected_batch_size=Q * len(data),
                           generator=generator)
    return model.weight.detach()[0].double().numpy()


def audit(script, accountant, replay=False):
    """One audited run: (eps_LB, claimed eps). With replay, the adversary also trains on blank
    data of the same (public) size with the generator of KNOWN_SEED and subtracts it: exactly
    the mechanism's noise if training used that seed, unrelated noise otherwise."""
    noise_multiplier = accountant.get_noise_multiplier(EPS, DELTA, Q, STEPS)
    claimed = accountant.epsilon_rdp(Q, noise_multiplier, STEPS, DELTA)
    rng = np.random.default_rng(AUDIT_SEED)
    included = rng.random(M) < 0.5
    data = torch.eye(M)[torch.from_numpy(included)]
    # The insecure path, on purpose: a test must be reproducible. A correct mechanism's noise
    # is still unknown to the adversary, who replays KNOWN_SEED.
    mechanism = script.secret_generator(insecure_seed=MECHANISM_SEED)
    scores = train_on_canaries(script, data, noise_multiplier, mechanism)
    if replay:
        guess = script.secret_generator(insecure_seed=KNOWN_SEED)
        scores = scores - train_on_canaries(script, torch.zeros_like(data), noise_multiplier, guess)
    return accountant.audit_one_run(scores, included, K, DELTA, rng, ALPHA), claimed


def break_clipping(monkeypatch, script):
    monkeypatch.setattr(script, "clip_per_example", lambda grads, C: grads)


def break_noise_scale(monkeypatch, script):
    add_dp_noise = script.add_dp_noise
    monkeypatch.setattr(script, "add_dp_noise", lambda summed, noise_multiplier, C, generator:
                        add_dp_noise(summed, noise_multiplier / 10, C, generator))


def break_secret_seed(monkeypatch, script):
    secret_generator = script.secret_generator
    monkeypatch.setattr(script, "secret_generator", lambda device="cpu", insecure_seed=None:
                        secret_generator(device, insecure_seed=KNOWN_SEED))


@pytest.fixture(params=["dpsgd", "dpdm"])
def script(request):
    """02's and 04's DP-SGD, loaded by conftest's fixtures."""
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("replay", [False, True])
def test_correct_mechanism_stays_below_its_claim(script, accountant, replay):
    # false alarm <= ALPHA = 1e-3 over the seeds for a truly (EPS, DELTA)-DP step
    lower, claimed = audit(script, accountant, replay)
    assert claimed == pytest.approx(EPS, rel=1e-5)  # calibrated to 1e-6 from below
    assert lower <= claimed


@pytest.mark.parametrize("breakage, replay", [
    (break_clipping, False), (break_noise_scale, False), (break_secret_seed, True),
])
def test_broken_mechanism_exceeds_its_claim(script, accountant, monkeypatch, breakage, replay):
    # each breakage shows eps_LB near the audit's largest value, far above the claim
    breakage(monkeypatch, script)
    lower, claimed = audit(script, accountant, replay)
    assert lower > claimed
