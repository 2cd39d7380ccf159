"""Chapter 04 as an adversary and a new user try it: the guarantee survives resume and known
seeds, private files stay private, every bad input is refused before --out is touched, and
every hint the script prints is a command that works. Tiny IDX data written here."""
import json
import re
import shlex

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import exits_2, load_script, tiny_mnist

m = load_script("04_dpdm_mnist")


def run_main(*argv):
    m.main([str(a) for a in argv])


def smoke_args(data, out, *more):
    return ["--preset", "smoke", "--data-dir", data, "--unverified", "--out", out, *more]


def refused(capsys, *argv):
    return exits_2(capsys, m.main, *argv)


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.exists() else None


def hint(text, word):
    """The command after `word` in a message, as argv for main()."""
    cmd = shlex.split(text.split(word)[1].split(";")[0])
    assert cmd[:2] == ["python", "04_dpdm_mnist.py"], cmd
    return cmd[2:]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished smoke run with secret noise: (data folder, out folder)."""
    base = tmp_path_factory.mktemp("run")
    data = tiny_mnist(base / "data")
    run_main(*smoke_args(data, base / "out"))
    return data, base / "out"


def copy(folder, dst):
    dst.mkdir(parents=True)
    for p in folder.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


# --------------------------------------------------------------------------- a void run stays void
def crash_after_first_checkpoint(monkeypatch, *argv):
    """main(argv) killed right after its first checkpoint, as a crash would."""
    real = m.save_run

    def save_then_crash(*a, **k):
        real(*a, **k)
        raise RuntimeError("simulated crash after the first checkpoint")
    monkeypatch.setattr(m, "save_run", save_then_crash)
    with pytest.raises(RuntimeError):
        run_main(*argv)
    monkeypatch.undo()


def test_resume_keeps_a_void_run_void_and_refuses_to_drop_the_seed(run, tmp_path, monkeypatch,
                                                                    capsys):
    data, _ = run
    out = tmp_path / "out"
    crash_after_first_checkpoint(monkeypatch, *smoke_args(data, out, "--insecure-noise-seed", 5))
    before = snapshot(out)
    err = refused(capsys, *smoke_args(data, out, "--resume"))  # the seed left out
    assert "--insecure-noise-seed 5" in err and "stays void" in err and snapshot(out) == before
    run_main(*smoke_args(data, out, "--resume", "--insecure-noise-seed", 5))
    summary = capsys.readouterr().out.split("==== summary")[-1]
    assert "nothing in" in summary and "is private" in summary and "safe to publish" not in summary
    assert "VOID" in torch.load(out / "model.pt", weights_only=True)["privacy"]["privacy_guarantee"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert "VOID" in metrics["dp_release"]["privacy_guarantee"]
    assert "VOID" in str(np.load(out / "samples.npz")["privacy_guarantee"])
    assert "VOID" in Image.open(out / "grid.png").text["privacy_guarantee"]


def test_a_secret_run_cannot_be_resumed_with_known_noise(run, tmp_path, monkeypatch, capsys):
    data, _ = run
    out = tmp_path / "out"
    crash_after_first_checkpoint(monkeypatch, *smoke_args(data, out))
    err = refused(capsys, *smoke_args(data, out, "--resume", "--insecure-noise-seed", 5))
    assert "--insecure-noise-seed" in err


def test_a_valid_run_labels_every_output_valid(run):
    _, out = run
    assert str(np.load(out / "samples.npz")["privacy_guarantee"]) == "valid"
    assert Image.open(out / "grid.png").text["privacy_guarantee"] == "valid"


# --------------------------------------------------------------------------- the secret's size
def test_seeds_that_differ_above_bit_32_give_different_noise():
    """torch's CPU manual_seed keeps 32 bits: 42 and 42 + 2^32 would replay the same run."""
    draws = [torch.randn(8, generator=m.secret_generator(insecure_seed=s))
             for s in (42, 42 + 2 ** 32, 42 + 12345 * 2 ** 40)]
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    again = torch.randn(8, generator=m.secret_generator(insecure_seed=42))
    assert torch.equal(draws[0], again)


def test_the_whole_mersenne_twister_state_is_secret():
    """Two secret generators never share a state, and all 624 words come from the OS."""
    a, b = m.secret_generator(), m.secret_generator()
    words = lambda g: np.frombuffer(bytes(g.get_state().tolist())[24:24 + 624 * 8], np.uint32)[::2]
    assert not np.array_equal(words(a), words(b))
    assert len(set(words(a).tolist())) > 600  # not a 32-bit seed expanded by the MT's own init
    assert not torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))


# --------------------------------------------------------------------------- private state
def test_resume_refuses_other_data_of_the_same_size(run, tmp_path, capsys):
    data, out = run
    other = tiny_mnist(tmp_path / "other", seed=1)  # same N, other pixels
    err = refused(capsys, *smoke_args(other, copy(out, tmp_path / "out"), "--resume"))
    assert "other data" in err


def test_private_files_are_readable_by_their_owner_alone(run):
    _, out = run
    assert (out / m.STATE_FILE).stat().st_mode & 0o777 == 0o600
    assert (out / "model.pt").stat().st_mode & 0o077 != 0  # the release is meant to be shared


def test_progress_reports_the_expected_batch_not_the_realised_one(run, tmp_path, monkeypatch,
                                                                  capsys):
    """The realised Poisson batch sizes are private: the rate printed uses qN."""
    monkeypatch.setattr(m, "poisson_sample", lambda n, q, g: torch.zeros(0, dtype=torch.long))
    run_main(*smoke_args(run[0], tmp_path / "out"))
    rates = re.findall(r"\|\s+(\d+) ex/s", capsys.readouterr().out)
    assert rates and all(int(r) > 0 for r in rates)


def test_04_refuses_batchnorm_as_02_does():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    loss = lambda f, x: f(x).pow(2).sum(1)
    with pytest.raises(ValueError, match="GroupNorm"):
        m.private_gradient(model, loss, torch.ones(4, 3), C=1.0, noise_multiplier=1.0,
                           expected_batch_size=4, generator=torch.Generator())


# --------------------------------------------------------------------------- nothing lost
def test_a_failing_overwrite_leaves_the_folder_as_it_was(run, tmp_path, capsys):
    data, out = run
    folder = copy(out, tmp_path / "out")
    before = snapshot(folder)
    refused(capsys, *smoke_args(tmp_path / "nowhere", folder, "--overwrite"))
    refused(capsys, "--eval-only", "--ckpt", folder / "model.pt", "--out", folder,
            "--data-dir", tmp_path / "nowhere", "--overwrite")
    assert snapshot(folder) == before


def test_overwrite_replaces_the_old_run_file_by_file(run, tmp_path, monkeypatch):
    """Until its first checkpoint the old run stays whole; from then on none of its samples or
    metrics lie beside the new model.pt, which they would misdescribe."""
    data, out = run
    folder = copy(out, tmp_path / "out")
    crash_after_first_checkpoint(monkeypatch, *smoke_args(data, folder, "--overwrite"))
    assert (folder / "model.pt").read_bytes() != (out / "model.pt").read_bytes()
    assert not any((folder / name).exists() for name in m.SAMPLE_FILES)


def test_the_real_error_is_named_before_the_output_folder(run, capsys):
    data, out = run
    for more, needle in ((["--eps", 0], "--eps"), (["--eps", -1], "--eps"),
                         (["--dataset", "cifar"], "--dataset"), (["--delta", 0.5], "--delta")):
        assert needle in refused(capsys, *smoke_args(data, out, *more))
    err = refused(capsys, *smoke_args(data.parent / "nowhere", out))
    assert "--data-dir" in err and "already holds" not in err


def test_every_hint_is_a_command_that_works(run, tmp_path, capsys):
    data, out = run
    folder = copy(out, tmp_path / "out")
    err = refused(capsys, *smoke_args(data, folder))  # a finished run is there
    run_main(*hint(err, "Continue that run with: "))  # samples again, eps unchanged
    run_main(*hint(err, "start over with: "))
    resampled = tmp_path / "resampled"
    run_main("--eval-only", "--ckpt", folder / "model.pt", "--out", resampled, "--data-dir", data,
             "--unverified")
    err = refused(capsys, "--eval-only", "--ckpt", folder / "model.pt", "--out", resampled,
                  "--data-dir", data, "--unverified")
    assert "--resume" not in err
    run_main(*hint(err, "Replace them with: "))


def test_ctrl_c_during_eval_only_names_a_command_that_works(run, tmp_path, monkeypatch, capsys):
    data, out = run
    args = ["--eval-only", "--ckpt", out / "model.pt", "--out", tmp_path / "ev", "--data-dir", data,
            "--unverified"]

    def interrupt(*a, **k):
        raise KeyboardInterrupt
    real_generate = m.generate
    monkeypatch.setattr(m, "generate", interrupt)  # nothing written yet: the same command
    with pytest.raises(SystemExit):
        run_main(*args)
    assert "--overwrite" not in capsys.readouterr().err and not (tmp_path / "ev").exists()
    monkeypatch.setattr(m, "generate", real_generate)
    monkeypatch.setattr(m, "evaluate", interrupt)  # after the samples were written
    with pytest.raises(SystemExit) as exit_:
        run_main(*args)
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert exit_.value.code == 130 and (tmp_path / "ev" / "samples.npz").exists()
    run_main(*hint(err, "Continue with: "))
    assert "downstream" in json.loads((tmp_path / "ev" / "metrics.json").read_text())["evaluation"]


def test_labels_outside_the_classes_are_refused_at_load(tmp_path):
    data = tiny_mnist(tmp_path / "data")
    labels = np.arange(96) % 10
    labels[50] = 12
    raw = bytes([0, 0, 8, 1]) + (96).to_bytes(4, "big") + labels.astype(np.uint8).tobytes()
    (data / "train-labels-idx1-ubyte").write_bytes(raw)
    with pytest.raises(m.UserError, match="each 0-9"):
        m.load_data("mnist", data, unverified=True)


# --------------------------------------------------------------------------- the summary adds up
def test_after_a_resume_the_summary_parts_add_up_to_its_total(run, tmp_path, monkeypatch, capsys):
    data, _ = run
    out = tmp_path / "out"
    crash_after_first_checkpoint(monkeypatch, *smoke_args(data, out, "--epochs", 4))
    capsys.readouterr()
    run_main(*smoke_args(data, out, "--epochs", 4, "--resume"))
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("time "))
    total, *parts = map(float, re.findall(r"(\d+\.\d+)", line))
    assert abs(total - sum(parts)) <= 0.1 * len(parts), line  # each part rounded to 0.1 min
    times = json.loads((out / "metrics.json").read_text())["not_covered_by_dp"]
    assert {"train_s", "sample_s", "other_s"} <= set(times)


def test_sampling_prints_the_time_left_after_its_first_batch(run, capsys):
    _, out = run
    _, ema, _, _ = m.load_model_file(out / "model.pt", "cpu")
    capsys.readouterr()
    m.generate(ema, m.SamplerConfig(sample_steps=2), 30, "cpu", 0, batch=10)
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("  sampled 10/30") and first.endswith("min left"), first


# --------------------------------------------------------------------------- every flag, every typo
FILE = "__a_file__"  # replaced by the path of a file
BAD = {
    "--preset": ["huge"], "--out": [FILE], "--data-dir": [FILE, "__nowhere__"],
    "--ckpt": ["__nowhere__", FILE], "--fid-network": ["__nowhere__", FILE],
    "--fid-ref": ["val"], "--eval-epochs": [0, -1, "abc", 1.5], "--sampler-setting": ["best"],
    "--insecure-noise-seed": ["abc", "nan", 1.5], "--threads": [0, -1, "abc", "nan"],
    "--device": ["tpu", "cuda:7"], "--dataset": ["cifar"], "--channels": [0, -1, "abc", 1.5],
    "--mults": ["0", "-1", "a", "1,,2"], "--blocks": [0, -1, "abc"], "--attn": ["-1", "x"],
    "--unshuffle": [0, -1, 3], "--noise-channels": [-1, "abc"], "--param": ["x"],
    "--p-mean": ["nan", "inf", "abc"], "--p-std": [0, -1, "nan", "inf"],
    "--logsnr-min": ["nan", "inf", 20], "--logsnr-max": ["nan", "-inf", -20],
    "--K": [0, -1, "abc", 1.5], "--label-dropout": [-1, 1, "nan", "inf"],
    "--eps": [0, -1, "nan", "inf", "abc"], "--delta": [0, -1, "nan", "inf", 0.5],
    "--batch": [0, -1, "abc"], "--epochs": [0, -1, "nan", "inf"], "--clip": [0, -1, "nan", "inf"],
    "--lr": [0, -1, "nan", "inf"], "--ema": [-1, 1, "nan", "inf"], "--seed": ["abc", "nan", 1.5],
    "--chunk": [0, -1, "abc"], "--ckpt-every": [0, -1, "abc"], "--log-every": [0, -1, "abc"],
    "--sampler": ["euler"], "--sample-steps": [0, 1, -1, "abc"], "--s-churn": [-1, "nan", "inf"],
    "--s-min": [-1, "nan", "inf"], "--s-max": [-1, "nan", "inf"], "--s-noise": [-1, "nan", "inf"],
    "--guidance": [-1, "nan", "inf"], "--sigma-min": [0, -1, "nan", "inf"],
    "--sigma-max": [0, "nan", "inf", 0.001], "--rho": [0, -1, "nan", "inf"],
    "--num-samples": [0, -1, "abc"]}
SWITCHES = {"-h", "--help", "--unverified", "--resume", "--overwrite", "--sample-only",
            "--eval-only", "--eval", "--no-eval", "--fid"}


def test_the_table_covers_every_flag_and_help_explains_each():
    parser = m.build_parser()
    flags = {s for a in parser._actions for s in a.option_strings}
    assert flags - SWITCHES == set(BAD)
    for action in parser._actions:
        assert action.help and (action.nargs == 0 or "[default" in action.help), action.dest


@pytest.mark.parametrize("flag,value", [(f, v) for f, vs in BAD.items() for v in vs])
def test_every_mistyped_value_exits_2_naming_the_flag_and_touches_nothing(run, tmp_path, capsys,
                                                                          flag, value):
    data, out = run
    folder = copy(out, tmp_path / "out")
    (tmp_path / "a_file").write_text("not a folder, not a model")
    value = {FILE: tmp_path / "a_file", "__nowhere__": tmp_path / "nowhere"}.get(value, value)
    before = snapshot(folder)
    context = {"--ckpt": ["--sample-only"], "--fid-network": ["--fid"]}.get(flag, [])
    argv = smoke_args(data, folder, *context, flag, value)
    if flag == "--out":
        argv = smoke_args(data, value)
    err = refused(capsys, *argv)
    assert flag in err and "already holds" not in err, err
    assert snapshot(folder) == before
