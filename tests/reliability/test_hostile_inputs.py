"""The hostile-user catalogue: inputs and faults beyond test_bad_inputs.py, each run through
``launch.main`` under a time bound.

Every case must end with exit status 2 and exactly one ``error:`` line that names the culprit,
no traceback, and no hang (a SIGALRM deadline per case). Together with test_bad_inputs.py
this is the project's catalogue of refused inputs (``test_catalogue_size`` counts both).
Cases that must *succeed* with the right result (exit 0 is only fine when the result is right)
are below the table.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import CONFIGS
from test_bad_inputs import _images, recipe_writer
from test_bad_inputs import cases as first_cases

import launch

TINY = str(CONFIGS / "tiny-digits.yaml")
CASE_DEADLINE_S = 60  # a case still running after this is a hang (generous: shared CPUs)
# model.params={}: tiny-digits' params belong to its mlp, not to the models swapped in here
TEXT = ["data.format=text", "model.name=minilm", "model.params={}", "data.shots=1",
        "data.test_split=null"]
IMAGES = ["data.format=image_folder", "data.test_split=null", "data.shots=1", "data.channels=3",
          "data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]", "model.name=mlp:192",
          "data.val_shots=0"]


# --------------------------------------------------------------------------------------------
# Shared fixtures: files, a silent network listener, a finished run to resume


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (no pixel data: cheap to write)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


@contextlib.contextmanager
def silent_listener() -> Iterator[str]:
    """A TCP server that accepts connections and never answers (a hung dashboard)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                held.append(conn)
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(2)
        for c in held:
            c.close()
        server.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished 2-epoch tiny-digits run; cases copy and damage its folder."""
    out = tmp_path_factory.mktemp("finished")
    assert launch.main(["train", TINY, f"train.output_dir={out}", "train.epochs=2",
                        "train.run_name=done", "train.save_checkpoints=true"]) == 0
    return out / "done"


def copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def cases(tmp: Path, finished: Path, listener: str) -> list[tuple[str, list[str], str]]:
    """(what, argv, text the one-line message must contain)."""
    recipe = recipe_writer(tmp / "recipes")

    def text_ds(name: str, files: dict[str, str]) -> Path:
        root = tmp / name
        root.mkdir()
        for fname, content in files.items():
            (root / fname).write_text(content, newline="")
        return root

    def on(ds_root: Path, *extra: str) -> list[str]:
        return ["train", TINY, *TEXT, f"data.root={ds_root}", *extra]

    ds = {
        "unterminated": text_ds("unterminated", {"train.csv": 'label,text\n0,"bad\n1,good\n0,x\n1,y\n'}),
        "stray_quote": text_ds("stray", {"train.csv": 'label,text\n0,a\n1,"b"c\n'}),
        "header_only": text_ds("hdr", {"train.tsv": "label\ttext\n"}),
        "empty_jsonl": text_ds("emptyjsonl", {"train.jsonl": "\n\n"}),
        "zero_bytes": text_ds("zero", {"train.tsv": ""}),
        "jsonl_u2028": text_ds("u2028j", {"train.jsonl": '{"label": 0, "text": "a\u2028b"}\n'
                                          '{"label": 1, "text": "c"}\n{"label": 1, "text": \n'}),
        "tsv_u2028": text_ds("u2028t", {"train.tsv": "label\ttext\n0\ta\u2028b\u0085c\n1\td\n"
                                        "0\n"}),
        "csv_multiline": text_ds("multi", {"train.csv": 'label,text\n0,"two\nlines"\n1,b\nx,c\n'}),
        "jsonl_bool": text_ds("bool", {"train.jsonl": '{"label": 0, "text": "a"}\n'
                                       '{"label": true, "text": "b"}\n'}),
        "jsonl_huge": text_ds("huge", {"train.jsonl": '{"label": 0, "text": "a"}\n'
                                       '{"label": 1000000000000, "text": "b"}\n'}),
        "jsonl_list": text_ds("list", {"train.jsonl": '{"label": 0, "text": "a"}\n[1, "b"]\n'}),
        "jsonl_nocol": text_ds("nocolj", {"train.jsonl": '{"label": 0, "text": "a"}\n'
                                          '{"label": 1, "sentence": "b"}\n'}),
        "no_test": text_ds("notest", {"train.tsv": "label\ttext\n" + "0\ta\n1\tb\n" * 2}),
        "dup_column": text_ds("dupcol", {"train.csv": "label,text,text\n0,a,b\n1,c,d\n"}),
        "label_gap": text_ds("gap", {"train.tsv": "label\ttext\n0\ta\n0\tb\n90000\tc\n"}),
    }
    empty_class = _images(tmp / "emptyclass", [(8, 8)] * 4)
    (empty_class / "train" / "c9").mkdir()
    (empty_class / "train" / "c9" / "notes.txt").write_text("not an image")
    huge = _images(tmp / "huge", [(8, 8)] * 4)
    (huge / "train" / "c1" / "bomb.png").write_bytes(png_header(50_000, 50_000))
    big = _images(tmp / "big", [(8, 8)] * 4)
    (big / "train" / "c1" / "big.png").write_bytes(png_header(9_000, 9_000))
    fake = _images(tmp / "fake", [(8, 8)] * 4)
    (fake / "train" / "c0" / "text.png").write_text("hello, not a png")
    no_test_folder = _images(tmp / "notestdir", [(8, 8)] * 4)

    deep = "a: " + "[" * 5000 + "]" * 5000 + "\n"
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi"))
    bomb_params = "augment:\n  policy: classic\n  params:\n    rotation: 3\n    x: &x [1, 1, 1]\n"

    # damaged copies of a finished run (resume cases)
    def damaged(name: str, damage) -> str:
        run = copy_run(finished, tmp / "resume" / name / "done")
        damage(run)
        return str(run.parent)

    ck = "checkpoints"
    dangling = damaged("dangling", lambda d: (d / ck / "latest").write_text("step-0000099"))
    outside = damaged("outside", lambda d: (d / ck / "latest").write_text("../../../etc"))
    no_progress = damaged("noprogress", lambda d: (d / ck / "final" / "progress.json").write_text("{"))
    bad_weights = damaged("badweights", lambda d: (d / ck / "final" / "model.pt").write_bytes(b"junk"))
    other_model = damaged("othermodel", lambda d: None)
    no_record = damaged("norecord", lambda d: (d / "config.yaml").unlink())
    more_epochs = damaged("more", lambda d: None)

    resume = ["train.resume=true", "train.run_name=done", "train.epochs=2"]
    env_timeout = ("SMALLSHOT_HTTP_TIMEOUT_S", "1")
    return [
        # text files: physical lines, quotes, empty files
        ("csv unterminated quote", on(ds["unterminated"]), "line 2: unterminated quote"),
        ("csv stray quote", on(ds["stray_quote"]), "line 3: invalid CSV"),
        ("tsv header only", on(ds["header_only"]), "no examples"),
        ("jsonl only blank lines", on(ds["empty_jsonl"]), "no examples"),
        ("tsv of zero bytes", on(ds["zero_bytes"]), "empty file"),
        ("jsonl U+2028 keeps line numbers", on(ds["jsonl_u2028"]), "line 3: invalid JSON"),
        ("tsv U+2028/NEL keep line numbers", on(ds["tsv_u2028"]), "line 4: 1 fields"),
        ("csv quoted newline keeps numbers", on(ds["csv_multiline"]), "line 5: label 'x'"),
        ("jsonl boolean label", on(ds["jsonl_bool"]), "line 2: label True"),
        ("jsonl huge label", on(ds["jsonl_huge"]), "line 2: label 1000000000000 is too large"),
        ("jsonl row not an object", on(ds["jsonl_list"]), "line 2: expected a JSON object"),
        ("jsonl row missing text", on(ds["jsonl_nocol"]), "line 2: missing column 'text'"),
        ("missing test split file", on(ds["no_test"], "data.test_split=test"), "no test.tsv"),
        ("duplicate header column", on(ds["dup_column"]), "line 1: column 'text' appears twice"),
        ("label gap", on(ds["label_gap"]), "no example of label(s) 1, 2, 3, 4, 5, ..."),
        # images
        ("empty class folder", ["train", TINY, *IMAGES, f"data.root={empty_class}"],
         "c9: class folder without images"),
        ("oversized image", ["train", TINY, *IMAGES, f"data.root={huge}"],
         "bomb.png: larger than one image may be"),
        ("large image under Pillow's bound", ["train", TINY, *IMAGES, f"data.root={big}"],
         "big.png: 9000x9000 pixels: larger than one image may be"),
        ("text file named .png", ["train", TINY, *IMAGES, f"data.root={fake}"],
         "text.png: unreadable image"),
        ("no test folder", ["train", TINY, *IMAGES, f"data.root={no_test_folder}",
                            "data.test_split=test"], "no folder 'test'"),
        ("model too small for images", ["train", TINY, *IMAGES, f"data.root={no_test_folder}",
                                        "model.name=mlp:64"], "cannot take the inputs"),
        ("rgb data into a 1-channel mlp", ["train", TINY, "data.channels=3",
                                           "data.mean=[0.3,0.3,0.3]", "data.std=[0.4,0.4,0.4]"],
         "model.name='mlp:64' cannot take the inputs"),
        # (grey images into an RGB ResNet are fine: its filters are summed to one channel)
        ("8x8 digits into an mlp for 28x28 images", ["train", TINY, "model.name=mlp:784"],
         "model.name='mlp:784' cannot take the inputs"),
        # recipes and config sections
        ("recipe without data section", ["train", recipe("nodata.yaml", "name: x\n")],
         "data.root: required"),
        ("val_shots with shots=null", ["train", TINY, "data.shots=null", "data.val_shots=5"],
         "data.val_shots=5"),
        ("yaml alias bomb", ["train", recipe("bomb.yaml", bomb)], "aliases"),
        ("yaml alias bomb in params", ["train", recipe("pbomb.yaml", bomb_params + "".join(
            f"    {c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
            for p, c in zip("xabcdefg", "abcdefgh")))], "aliases"),
        ("yaml recursive alias", ["train", recipe("rec.yaml", "a: &a [*a]\n")], "recursive"),
        ("yaml nested too deep", ["train", recipe("deep.yaml", deep)], "nested"),
        ("recipe too large", ["train", recipe("big.yaml", "name: x\n" + "#" * (2 << 20) + "\n")],
         "too large"),
        ("yaml python object tag", ["train", recipe("obj.yaml",
                                                    "name: !!python/object/apply:os.system [id]\n")],
         "invalid YAML"),
        ("alias bomb as override", ["train", TINY, "augment.policy=classic",
                                    "augment.params={x: &x [1,1,1,1,1,1,1,1,1,1], "
                                    "y: &y [*x,*x,*x,*x,*x,*x,*x,*x,*x,*x], "
                                    "z: &z [*y,*y,*y,*y,*y,*y,*y,*y,*y,*y], "
                                    "w: &w [*z,*z,*z,*z,*z,*z,*z,*z,*z,*z], "
                                    "v: [*w,*w,*w,*w,*w,*w,*w,*w,*w,*w,*w,*w]}"], "aliases"),
        # names that become paths
        ("run_name escapes", ["train", TINY, "train.run_name=../escaped"], "train.run_name"),
        ("run_name absolute", ["train", TINY, "train.run_name=/tmp/abs"], "train.run_name"),
        ("recipe name escapes", ["train", recipe("esc.yaml", "name: ../../up\n"
                                                 "data:\n  format: digits\n")], "name"),
        ("split name escapes", ["train", TINY, "data.format=text", f"data.root={ds['no_test']}",
                                "data.test_split=null", "data.train_split=../notest/train"],
         "data.train_split"),
        ("sweep name escapes", ["tune", TINY, "tune.name=../../x",
                                "tune.space={optim.lr: 'choice[0.1, 0.2]'}"], "tune.name"),
        # checkpoints and resume
        ("latest names a missing step", ["train", TINY, f"train.output_dir={dangling}", *resume],
         "names checkpoint 'step-0000099'"),
        ("latest points outside", ["train", TINY, f"train.output_dir={outside}", *resume],
         "names checkpoint '../../../etc'"),
        ("progress.json unreadable", ["train", TINY, f"train.output_dir={no_progress}", *resume],
         "progress.json: missing or unreadable"),
        ("weights file junk", ["train", TINY, f"train.output_dir={bad_weights}", *resume],
         "model.pt: unreadable or unsafe"),
        ("resume another model", ["train", TINY, f"train.output_dir={other_model}", *resume,
                                  "model.params={hidden: 32}"], "model.params differ"),
        ("resume another model, no record", ["train", TINY, f"train.output_dir={no_record}",
                                             *resume, "model.params={hidden: 32}"],
         "does not fit this run's model"),
        ("resume a finished run for longer", ["train", TINY, f"train.output_dir={more_epochs}",
                                              "train.resume=true", "train.run_name=done",
                                              "train.epochs=3"], "finished run"),
        # sweeps and reports
        ("report on a plain folder", ["report", str(tmp)], "not a sweep folder"),
        ("tune without a space", ["tune", TINY], "tune.space: empty"),
        ("tune on test metrics", ["tune", TINY, "tune.metric=test/accuracy",
                                  "tune.space={optim.lr: 'choice[0.1, 0.2]'}"], "validation data"),
        ("--retry-errored alone", ["tune", TINY, "--retry-errored",
                                   "tune.space={optim.lr: 'choice[0.1, 0.2]'}"], "--resume"),
        ("--resume of no sweep", ["tune", TINY, "--resume", f"train.output_dir={tmp / 'nosw'}",
                                  "tune.space={optim.lr: 'choice[0.1, 0.2]'}"], "no sweep"),
        ("seeds 0", ["seeds", TINY, "--seeds", "0"], "--seeds 0"),
        ("hf folder missing", ["train", TINY, "model.name=hf:/nonexistent/model",
                               "model.params={}"],
         "folder not found"),
        ("hf folder without config", ["train", TINY, f"model.name=hf:{tmp}", "model.params={}"],
         "not a Hugging Face model folder"),
        # the network: every call has a deadline
        ("submit to a silent dashboard", ["submit", TINY, "--address", listener, "--no-follow",
                                          env_timeout], "did not answer within 1 s"),
        ("status from a silent dashboard", ["status", "x", "--address", listener, env_timeout],
         "did not answer within 1 s"),
        ("logs from a silent dashboard", ["logs", "x", "--address", listener, env_timeout],
         "did not answer within 1 s"),
        ("stop on a silent dashboard", ["stop", "x", "--address", listener, env_timeout],
         "did not answer within 1 s"),
        ("submit to a closed port", ["submit", TINY, "--address",
                                     f"http://127.0.0.1:{closed_port()}"], "cannot reach"),
        ("bad timeout setting", ["status", "x", "--address", listener,
                                 ("SMALLSHOT_HTTP_TIMEOUT_S", "soon")],
         "SMALLSHOT_HTTP_TIMEOUT_S='soon'"),
    ]


class Hang(Exception):
    pass


def _on_alarm(signum, frame):  # noqa: ARG001 - signal handler signature
    raise Hang


def run_case(argv: list, capsys, out_dir: Path) -> tuple[int | None, str, float]:
    """(exit status or None on a hang, stderr, seconds) of one catalogue case."""
    env = dict(a for a in argv if isinstance(a, tuple))
    argv = [a for a in argv if not isinstance(a, tuple)]
    if argv[0] in ("train", "seeds", "tune") and not any("train.output_dir" in a for a in argv):
        argv = [*argv, f"train.output_dir={out_dir}"]
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(CASE_DEADLINE_S)
    start = time.perf_counter()
    try:
        code: int | None = launch.main(argv)
    except Hang:
        code = None
    except SystemExit as e:
        code = int(e.code or 0)
    except Exception as e:  # noqa: BLE001 - escaped launch.main: a traceback for the user
        print(f"Traceback (escaped launch.main): {type(e).__name__}: {str(e)[:200]}",
              file=sys.stderr)
        code = 1
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    return code, capsys.readouterr().err.strip(), time.perf_counter() - start


def test_hostile_catalogue(tmp_path, capsys, finished_run):
    """Each case: exit 2, one `error:` line naming the culprit, no traceback, under a deadline."""
    with silent_listener() as listener:
        table = cases(tmp_path, finished_run, listener)
        failures, times = [], []
        for what, argv, needle in table:
            code, err, took = run_case(argv, capsys, tmp_path / "runs")
            times.append((took, what))
            lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
            if code is None:
                failures.append(f"{what}: still running after {CASE_DEADLINE_S} s")
            elif not (code == 2 and len(lines) == 1 and needle in lines[0]
                      and "Traceback" not in err):
                failures.append(f"{what}: exit {code}, stderr {err[-400:]!r}")
    slow = sorted(times, reverse=True)[:3]
    print(f"\n{len(table)} hostile cases; slowest: "
          + ", ".join(f"{w} {t:.1f} s" for t, w in slow))
    assert not failures, "\n".join(failures)
    quick = sum(1 for t, _ in times if t < 1.0)
    assert quick >= len(table) * 0.6, f"only {quick}/{len(table)} cases failed within 1 s"


def test_catalogue_size(tmp_path, finished_run):
    """The two tables together hold at least 70 refused inputs run through launch.main."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    total = len(first_cases(tmp_path / "a")) + len(cases(tmp_path / "b", finished_run,
                                                         "http://127.0.0.1:9"))
    print(f"\ncatalogue: {total} refused inputs")
    assert total >= 70
