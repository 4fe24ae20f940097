"""``--pushgateway``: what a run pushes, a bad URL refused at start-up, and a failed push that
warns but keeps the run's output and exit code."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from ops_helpers import free_port, write_preds
from prometheus_client import generate_latest

from postproc import polygonize, pushmetrics, score
from postproc.cli import exit_on_error
from postproc.pushmetrics import PostprocRun, build_registry, push


def test_registry_carries_units_and_score_figures() -> None:
    run = PostprocRun(tiles=4, polygons=30, seconds=2.5,
                      score=dict(f1=0.8, precision=0.75, recall=6 / 7, tp=24, fp=8, fn=4))
    text = generate_latest(build_registry(run)).decode()
    for line in ("footprints_postproc_tiles_total 4.0", "footprints_postproc_polygons_total 30.0",
                 "footprints_postproc_seconds 2.5", "footprints_score_f1 0.8",
                 'footprints_score_polygons_total{outcome="fn"} 4.0'):
        assert line in text
    assert "footprints_postproc_last_success_timestamp_seconds" in text
    assert "footprints_score" not in generate_latest(build_registry(
        PostprocRun(tiles=1, polygons=1, seconds=1.0))).decode()


def test_polygonize_and_score_push_the_same_families_alike() -> None:
    """The gateway refuses a push whose family has another help text or type than the same
    family already pushed by another job: polygonize's push would break score's, or back."""
    def families(run: PostprocRun) -> dict[str, tuple[str, str]]:
        return {f.name: (f.type, f.documentation) for f in build_registry(run).collect()}

    poly = families(PostprocRun(tiles=2, polygons=5, seconds=1.0))
    scored = families(PostprocRun(tiles=3, polygons=7, seconds=2.0, score=dict(
        f1=0.5, precision=0.5, recall=0.5, tp=1, fp=1, fn=1)))
    assert set(poly) < set(scored)
    assert {name: scored[name] for name in poly} == poly


def test_merge_pushes_its_overlapping_pairs_and_the_common_families_alike() -> None:
    """Merge's overlap count is its own family, 0 too (an alert on > 0 must see a clean run),
    in no other command's push; the families it shares have polygonize's help and type."""
    def families(run: PostprocRun) -> dict[str, tuple[str, str]]:
        return {f.name: (f.type, f.documentation) for f in build_registry(run).collect()}

    name = "footprints_merge_overlapping_tile_pairs_total"
    for n in (0, 4):
        assert build_registry(PostprocRun(tiles=6, polygons=6, seconds=1.0, overlaps=n)
                              ).get_sample_value(name) == n
    assert "footprints_merge" not in generate_latest(build_registry(
        PostprocRun(tiles=1, polygons=1, seconds=1.0))).decode()
    poly = families(PostprocRun(tiles=2, polygons=5, seconds=1.0))
    merged = families(PostprocRun(tiles=2, polygons=5, seconds=1.0, overlaps=1))
    assert set(merged) - set(poly) == {"footprints_merge_overlapping_tile_pairs"}
    assert {k: merged[k] for k in poly} == poly


def test_last_success_is_the_time_of_the_push() -> None:
    """Alerts compute ``time() - footprints_postproc_last_success_timestamp_seconds``: the value
    is the Unix time in seconds when the run ended."""
    before = time.time()
    registry = build_registry(PostprocRun(tiles=1, polygons=1, seconds=1.0))
    after = time.time()
    stamp = registry.get_sample_value("footprints_postproc_last_success_timestamp_seconds")
    assert stamp is not None and before <= stamp <= after


@contextmanager
def capturing_gateway() -> Iterator[tuple[str, list[tuple[str, str, str]]]]:
    """A stand-in Pushgateway on a loopback port: (URL, the (method, path, body) it received)."""
    got: list[tuple[str, str, str]] = []

    class Gateway(BaseHTTPRequestHandler):
        def do_PUT(self) -> None:
            self._take()

        def do_POST(self) -> None:
            self._take()

        def _take(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"])).decode()
            got.append((self.command, self.path, body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Gateway)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", got
    finally:
        server.shutdown()
        server.server_close()


def test_a_push_replaces_the_group_of_this_job_and_host() -> None:
    """A PUT to /metrics/job/<job>/instance/<host>: the gateway keeps the last run per job and
    host (a POST would merge runs; without the instance two hosts would overwrite each other)."""
    with capturing_gateway() as (url, got):
        run = PostprocRun(tiles=3, polygons=9, seconds=1.5,
                          score=dict(f1=0.5, precision=0.5, recall=0.5, tp=2, fp=2, fn=2))
        assert push(url, "footprints_score", run)
    [(method, path, body)] = got
    assert (method, path) == ("PUT", f"/metrics/job/footprints_score/instance/"
                                     f"{socket.gethostname()}")
    assert "footprints_postproc_tiles_total 3.0" in body
    assert 'footprints_score_polygons_total{outcome="tp"} 2.0' in body


@pytest.mark.timeout(120)
def test_polygonize_and_score_push_what_they_wrote(tmp_path: Path) -> None:
    """Each command pushes under its default job the figures of its own output: polygonize
    the tiles and polygons of its CSV, score those of its JSON."""
    pred, truth = write_preds(tmp_path, tiles=2)
    out, js = tmp_path / "proposals.csv", tmp_path / "score.json"
    with capturing_gateway() as (url, got):
        assert polygonize.main(["--pred", str(pred), "--out", str(out), "--workers", "1",
                                "--pushgateway", url]) == 0
        rows = out.read_text().splitlines()
        # two buildings missing from the truth and one from the proposals: 2 FP, 1 FN
        proposals = tmp_path / "fewer.csv"
        proposals.write_text("\n".join(rows[:-1]) + "\n")
        lines = truth.read_text().splitlines()
        truth.write_text("\n".join(lines[:1] + lines[3:]) + "\n")
        assert score.main(["--truth", str(truth), "--proposals", str(proposals), "--json", str(js),
                           "--workers", "1", "--pushgateway", url]) == 0
    rows = rows[1:]
    scored = json.loads(js.read_text())
    assert scored["fp"] != scored["fn"] and scored["tp"] > 0, scored
    host = socket.gethostname()
    [(_, poly_path, poly), (_, score_path, sc)] = got
    assert poly_path == f"/metrics/job/footprints_polygonize/instance/{host}"
    assert score_path == f"/metrics/job/footprints_score/instance/{host}"
    assert f"footprints_postproc_tiles_total {float(len({r.split(',')[0] for r in rows}))}" in poly
    assert f"footprints_postproc_polygons_total {float(len(rows))}" in poly
    assert "footprints_score" not in poly
    assert "footprints_postproc_tiles_total 2.0" in sc
    assert f"footprints_postproc_polygons_total {float(scored['tp'] + scored['fp'])}" in sc
    for k in ("tp", "fp", "fn"):
        assert f'footprints_score_polygons_total{{outcome="{k}"}} {float(scored[k])}' in sc
    assert f"footprints_score_f1 {scored['f1']}" in sc


@pytest.mark.parametrize("url", ["ftp://x", "127.0.0.1:9091x", "http://127.0.0.1:abc",
                                 "http://127.0.0.1:99999", "http://:9091",
                                 "http://a b:9091", "http://gw\t:9091",
                                 # typos that pushed after the work to no host or host "http"
                                 "http:/127.0.0.1:9091", "http//127.0.0.1:9091"])
def test_bad_gateway_url_fails_before_any_work(url: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        score.main(["--truth", "t.csv", "--proposals", "p.csv", "--pushgateway", url])
    assert e.value.code == 2
    assert "--pushgateway" in capsys.readouterr().err


@pytest.mark.parametrize("url", ["127.0.0.1:9091", "localhost:9091", "https://gw",
                                 "http://gw:9091/prefix", "[::1]:9091"])
def test_gateway_urls_that_prometheus_client_takes_are_accepted(url: str) -> None:
    args = score.build_parser().parse_args(["--truth", "t.csv", "--proposals", "p.csv",
                                            "--pushgateway", url])
    assert args.pushgateway == url


@pytest.mark.timeout(60)
def test_a_gateway_that_never_answers_is_given_up(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A hung gateway must not hold a finished job: the push has a timeout, then warns."""
    monkeypatch.setattr(pushmetrics, "PUSH_TIMEOUT_S", 0.5)
    with socket.socket() as srv:  # accepts (the kernel's backlog) and never answers
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        url = f"http://127.0.0.1:{srv.getsockname()[1]}"
        assert not push(url, "footprints_test", PostprocRun(tiles=1, polygons=1, seconds=1.0))
    assert f"could not push metrics to the Pushgateway at {url}" in capsys.readouterr().err


def test_a_gateway_port_that_is_not_http_is_a_warning(
        capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as srv:  # answers like sshd: http.client raises BadStatusLine
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        url = f"http://127.0.0.1:{srv.getsockname()[1]}"

        def answer() -> None:
            conn, _ = srv.accept()
            with conn:
                conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
                conn.recv(4096)

        t = threading.Thread(target=answer, daemon=True)
        t.start()
        assert not push(url, "footprints_test", PostprocRun(tiles=1, polygons=1, seconds=1.0))
        t.join(timeout=10)
    assert f"could not push metrics to the Pushgateway at {url}" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_failed_push_warns_and_keeps_the_output(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    pred, truth = write_preds(tmp_path, tiles=2)
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    out, js = tmp_path / "proposals.csv", tmp_path / "score.json"
    argv = ["--pred", str(pred), "--out", str(out), "--workers", "1", "--pushgateway", dead]
    assert exit_on_error(lambda: polygonize.main(argv)) == 0
    err = capsys.readouterr().err
    assert f"could not push metrics to the Pushgateway at {dead}" in err
    assert out.read_text().startswith("ImageId,")
    argv = ["--truth", str(truth), "--proposals", str(out), "--json", str(js), "--workers", "1",
            "--pushgateway", dead]
    assert exit_on_error(lambda: score.main(argv)) == 0
    assert dead in capsys.readouterr().err
    assert json.loads(js.read_text())["f1"] == pytest.approx(1.0)
