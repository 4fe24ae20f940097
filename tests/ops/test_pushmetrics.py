"""``--pushgateway``: what a run pushes, a bad URL refused at start-up, and a failed push that
warns but keeps the run's output and exit code."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest
from ops_helpers import free_port, write_preds
from prometheus_client import generate_latest

from postproc import polygonize, score
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
