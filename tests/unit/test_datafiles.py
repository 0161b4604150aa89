"""Tests for blue_plugin.datafiles: the resolution order, real downloads from a local HTTP server
(and file:// URLs), refusal of truncated / garbage / wrong-shape files, the error messages, the CLI.

No test here needs the real datasets or the network: the payloads are generated, shaped like the
real files and just above each dataset's minimum size.
"""
from __future__ import annotations

import functools
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from blue_plugin import datafiles as D

CF_REL = "counterfact/counterfact-edit.json"
ZSRE_REL = "zsre/zsre_mend_eval_portability_gpt4.json"
FETCH_CF = "python -m blue_plugin.datafiles fetch counterfact"


# ------------------------------------------------------------------------------------------------
# fixtures and helpers
# ------------------------------------------------------------------------------------------------
def _records(name: str, n: int) -> list[dict]:
    if name == "counterfact":
        return [{"case_id": i, "prompt": f"The mother tongue of Person Number {i} is", "subject": f"Person Number {i}",
                 "target_new": "English", "ground_truth": "French",
                 "rephrase_prompt": f"Where Person Number {i} is from, people speak the language of",
                 "locality_prompt": f"Somebody Else {i} is a native speaker of", "locality_ground_truth": "French"}
                for i in range(n)]
    return [{"subject": f"Thing {i}", "src": f"Which family does Thing {i} belong to?", "pred": "x", "alt": "Family A",
             "answers": ["Family B"], "rephrase": f"What family is Thing {i} part of?", "cond": "x",
             "loc": f"nq question: who wrote book number {i}", "loc_ans": "Someone", "portability": {}}
            for i in range(n)]


@functools.lru_cache(maxsize=None)
def payload(name: str) -> bytes:
    """A valid file for dataset ``name``, a little over its minimum size."""
    n = 256
    while True:
        data = json.dumps(_records(name, n), indent=4).encode("utf-8")
        if len(data) >= D.DATASETS[name].min_bytes + 100_000:
            return data
        n *= 2


def files_under(root: Path) -> list[str]:
    """Every file below ``root`` (temporary files included), as sorted relative paths."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A clean environment: no BLUE_PLUGIN_DATA*, HOME and BLUE_PLUGIN_CACHE in tmp_path, cwd empty."""
    for var in list(os.environ):
        if var.startswith("BLUE_PLUGIN_DATA"):
            monkeypatch.delenv(var)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    home, work, cache = tmp_path / "home", tmp_path / "work", tmp_path / "cache"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("BLUE_PLUGIN_CACHE", str(cache))
    monkeypatch.chdir(work)
    return SimpleNamespace(tmp=tmp_path, home=home, cache=cache, data=cache / "data")


@pytest.fixture
def server():
    """An HTTP server on 127.0.0.1 serving ``routes[path] = (body, mode)``; unknown paths are 404.

    Modes: ``ok``; ``truncate`` (announces the full length, sends half, closes); ``pause`` (sends
    half, calls ``on_pause()`` and stores its result in ``paused``, sends the rest); ``hang``
    (waits 2 s before answering).
    """
    state = SimpleNamespace(routes={}, requests=[], on_pause=None, paused=None, port=None)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep pytest's output clean
            pass

        def do_GET(self):
            state.requests.append(self.path)
            if self.path not in state.routes:
                self.send_error(404, "Not Found")
                return
            body, mode = state.routes[self.path]
            if mode == "hang":
                time.sleep(2.0)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            half = len(body) // 2
            if mode == "truncate":
                self.wfile.write(body[:half])
                self.wfile.flush()
                self.close_connection = True
                return
            if mode == "pause":
                self.wfile.write(body[:half])
                self.wfile.flush()
                time.sleep(0.2)
                state.paused = state.on_pause()
                self.wfile.write(body[half:])
                return
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    state.port = httpd.server_address[1]
    state.url = lambda path: f"http://127.0.0.1:{state.port}{path}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()


def serve(server, monkeypatch, name: str, body: bytes, mode: str = "ok") -> str:
    """Serve ``body`` as dataset ``name`` and point ``$BLUE_PLUGIN_DATA_URL_<NAME>`` at it."""
    path = f"/{name}.json"
    server.routes[path] = (body, mode)
    url = server.url(path)
    monkeypatch.setenv(D.URL_ENV_PREFIX + name.upper().replace("-", "_"), url)
    return url


# ------------------------------------------------------------------------------------------------
# downloads
# ------------------------------------------------------------------------------------------------
def test_good_download_lands_atomically_in_the_cache(env, server, monkeypatch):
    serve(server, monkeypatch, "counterfact", payload("counterfact"), mode="pause")
    target = env.data / CF_REL
    # half-way through the transfer: only a temporary file, in the destination's folder
    server.on_pause = lambda: (target.exists(), files_under(env.data))
    got = D.resolve_data("counterfact")
    assert got == target and got.read_bytes() == payload("counterfact")
    exists_mid, files_mid = server.paused
    assert exists_mid is False
    assert len(files_mid) == 1 and files_mid[0].startswith("counterfact/.counterfact-edit.json.")
    assert files_mid[0].endswith(".part")
    assert files_under(env.data) == [CF_REL]
    # a second call finds the cached file and does not download again
    assert D.resolve_data("counterfact") == target and len(server.requests) == 1
    assert files_under(env.home) == []  # nothing under $HOME when BLUE_PLUGIN_CACHE is set


def test_download_from_a_file_url_via_the_base_url(env, monkeypatch):
    mirror = env.tmp / "mirror"
    (mirror / "zsre").mkdir(parents=True)
    (mirror / ZSRE_REL).write_bytes(payload("zsre"))
    monkeypatch.setenv(D.BASE_URL_ENV, mirror.as_uri())
    assert D.dataset_url("zsre") == mirror.as_uri() + "/" + ZSRE_REL
    got = D.resolve_data("zsre")
    assert got == env.data / ZSRE_REL and got.read_bytes() == payload("zsre")
    # the per-dataset variable wins over the base URL, and an explicit url over both
    monkeypatch.setenv(D.URL_ENV_PREFIX + "ZSRE", "http://127.0.0.1:9/z.json")
    assert D.dataset_url("zsre") == "http://127.0.0.1:9/z.json"
    assert D.dataset_url("zsre", url="file:///x.json") == "file:///x.json"


@pytest.mark.parametrize("case", ["truncated transfer", "truncated JSON", "garbage", "too small", "wrong shape",
                                  "not a list"])
def test_bad_downloads_are_refused_and_leave_nothing(env, server, monkeypatch, case):
    good = payload("counterfact")
    body, mode, message = {
        "truncated transfer": (good, "truncate", "truncated transfer"),
        "truncated JSON": (good[: len(good) - 1000], "ok", "not valid JSON"),
        "garbage": (os.urandom(D.DATASETS["counterfact"].min_bytes + 10), "ok", "not valid JSON"),
        "too small": (json.dumps(_records("counterfact", 3)).encode(), "ok", "expected at least"),
        # valid JSON of the right size, but zsRE records
        "wrong shape": (json.dumps(_records("zsre", 20000)).encode(), "ok", "lacks ['prompt', 'target_new'"),
        "not a list": (json.dumps({"records": _records("counterfact", 20000)}).encode(), "ok", "JSON list"),
    }[case]
    url = serve(server, monkeypatch, "counterfact", body, mode)
    with pytest.raises(D.DataDownloadError) as info:
        D.download_dataset("counterfact")
    assert message in str(info.value) and url in str(info.value)
    assert files_under(env.data) == []  # neither the file nor a temporary file
    # through the resolver: the same reason inside the not-found error, still nothing written
    with pytest.raises(D.DataFileNotFound, match=message.replace("[", r"\[")):
        D.resolve_data("counterfact")
    assert files_under(env.data) == []


def test_a_failed_download_keeps_the_previous_file(env, server, monkeypatch):
    target = env.data / CF_REL
    target.parent.mkdir(parents=True)
    target.write_text("previous")
    serve(server, monkeypatch, "counterfact", b"<html>oops</html>" * 300_000)
    with pytest.raises(D.DataDownloadError, match="not valid JSON"):
        D.fetch("counterfact", force=True)
    assert target.read_text() == "previous" and files_under(env.data) == [CF_REL]


def test_404_is_a_clear_error(env, server, monkeypatch):
    url = server.url("/missing/counterfact-edit.json")
    monkeypatch.setenv(D.URL_ENV_PREFIX + "COUNTERFACT", url)
    with pytest.raises(D.DataDownloadError) as info:
        D.download_dataset("counterfact")
    assert str(info.value) == f"{url}: HTTP 404 Not Found"
    assert files_under(env.data) == []


def test_unreachable_and_timeout_are_clear_errors(env, server, monkeypatch):
    with pytest.raises(D.DataDownloadError, match="cannot be reached"):
        D.download_dataset("zsre", url=(env.tmp / "nowhere.json").as_uri())
    url = serve(server, monkeypatch, "zsre", payload("zsre"), mode="hang")
    t0 = time.monotonic()
    with pytest.raises(D.DataDownloadError, match="timed out") as info:
        D.download_dataset("zsre", timeout=0.3)
    assert url in str(info.value) and time.monotonic() - t0 < 1.9
    assert files_under(env.data) == []


# ------------------------------------------------------------------------------------------------
# resolution order and errors
# ------------------------------------------------------------------------------------------------
def test_order_explicit_then_data_dir_then_cache_then_download(env, server, monkeypatch):
    serve(server, monkeypatch, "counterfact", payload("counterfact"))
    explicit = env.tmp / "mine.json"
    explicit.write_text("explicit")
    data_dir = env.tmp / "shared"
    (data_dir / "counterfact").mkdir(parents=True)
    (data_dir / CF_REL).write_text("data dir")
    (env.data / "counterfact").mkdir(parents=True)
    (env.data / CF_REL).write_text("cache")
    monkeypatch.setenv(D.DATA_ENV, str(data_dir))

    assert D.resolve_data("counterfact", path=explicit).read_text() == "explicit"
    assert D.resolve_data(explicit).read_text() == "explicit"  # a path as the first argument
    assert D.resolve_data("counterfact").read_text() == "data dir"
    assert D.resolve_data(CF_REL).read_text() == "data dir"  # the relative path names the entry too
    (data_dir / CF_REL).unlink()
    assert D.resolve_data("counterfact").read_text() == "cache"
    (env.data / CF_REL).unlink()
    assert D.locate("counterfact") is None and server.requests == []  # no download without asking
    assert D.resolve_data("counterfact").read_bytes() == payload("counterfact")
    assert server.requests == ["/counterfact.json"]
    assert D.resolve_data("counterfact") == (env.data / CF_REL)  # cached now


def test_several_data_dirs_are_searched_in_order(env, monkeypatch):
    first, second = env.tmp / "a", env.tmp / "b"
    for d, text in ((first, "a"), (second, "b")):
        (d / "zsre").mkdir(parents=True)
        (d / ZSRE_REL).write_text(text)
    monkeypatch.setenv(D.DATA_ENV, os.pathsep.join([str(first), str(second)]))
    assert D.resolve_data("zsre").read_text() == "a"
    (first / ZSRE_REL).unlink()
    assert D.resolve_data("ZSRE").read_text() == "b"


def test_an_explicit_path_that_does_not_exist_is_an_error(env, monkeypatch):
    data_dir = env.tmp / "shared"
    (data_dir / "counterfact").mkdir(parents=True)
    (data_dir / CF_REL).write_text("data dir")
    monkeypatch.setenv(D.DATA_ENV, str(data_dir))
    missing = env.tmp / "typo.json"
    with pytest.raises(D.DataFileNotFound, match="typo.json.*does not exist"):
        D.resolve_data("counterfact", path=missing)
    with pytest.raises(FileNotFoundError, match="not a known dataset name"):
        D.resolve_data(missing)


def test_other_relative_paths_are_looked_up_but_never_downloaded(env, monkeypatch):
    data_dir = env.tmp / "shared"
    (data_dir / "counterfact").mkdir(parents=True)
    (data_dir / "counterfact" / "templates.json").write_text("[]")
    with pytest.raises(D.DataFileNotFound, match="no such file"):
        D.resolve_data("counterfact/templates.json")
    monkeypatch.setenv(D.DATA_ENV, str(data_dir))
    assert D.resolve_data("counterfact/templates.json") == data_dir / "counterfact" / "templates.json"


def test_final_error_names_every_place_tried_and_the_fetch_command(env, server, monkeypatch):
    first, second = env.tmp / "a", env.tmp / "b"
    monkeypatch.setenv(D.DATA_ENV, os.pathsep.join([str(first), str(second)]))
    url = server.url("/gone.json")
    monkeypatch.setenv(D.URL_ENV_PREFIX + "COUNTERFACT", url)
    with pytest.raises(D.DataFileNotFound) as info:
        D.resolve_data("counterfact")
    msg = str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, FileNotFoundError)
    for place in (first / CF_REL, second / CF_REL, env.data / CF_REL, url, "HTTP 404", FETCH_CF, D.DATA_ENV):
        assert str(place) in msg, (place, msg)
    assert msg.index(str(first)) < msg.index(str(second)) < msg.index(str(env.data)) < msg.index(url)
    # download disabled: the address is named as not attempted, no request is made
    server.requests.clear()
    with pytest.raises(D.DataFileNotFound, match="not attempted") as info:
        D.resolve_data("counterfact", download=False)
    assert FETCH_CF in str(info.value) and server.requests == []


def test_the_corpus_resolves_but_has_no_download(env, monkeypatch):
    with pytest.raises(D.DataFileNotFound) as info:
        D.resolve_data("wordnet-glosses")
    assert "no public address" in str(info.value) and "wordnet-base" in str(info.value)
    assert "BLUE_PLUGIN_DATA" in str(info.value) and "fetch" not in str(info.value)
    data_dir = env.tmp / "shared"
    (data_dir / "corpus").mkdir(parents=True)
    (data_dir / "corpus" / "wordnet-glosses.txt").write_text("a gloss\n")
    monkeypatch.setenv(D.DATA_ENV, str(data_dir))
    assert D.resolve_data("wordnet_glosses") == data_dir / "corpus" / "wordnet-glosses.txt"
    assert D.resolve_data("corpus/wordnet-glosses.txt") == data_dir / "corpus" / "wordnet-glosses.txt"


def test_cache_dir_follows_the_models_cache_convention(env, monkeypatch):
    from blue_plugin.model.loading import default_cache_dir

    assert D.cache_dir() == env.cache / "data" == default_cache_dir() / "data"
    monkeypatch.delenv("BLUE_PLUGIN_CACHE")
    assert D.cache_dir() == env.home / ".cache" / "blue_plugin" / "data" == default_cache_dir() / "data"
    monkeypatch.setenv("XDG_CACHE_HOME", str(env.tmp / "xdg"))
    assert D.cache_dir() == env.tmp / "xdg" / "blue_plugin" / "data" == default_cache_dir() / "data"


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------
def test_cli_fetch_where_list(env, server, monkeypatch, capsys):
    assert D.main(["where", "counterfact"]) == 1
    assert FETCH_CF in capsys.readouterr().out
    serve(server, monkeypatch, "counterfact", payload("counterfact"))
    assert D.main(["fetch", "counterfact"]) == 0
    assert capsys.readouterr().out == f"counterfact\t{env.data / CF_REL}\n"
    assert (env.data / CF_REL).read_bytes() == payload("counterfact")
    assert D.main(["fetch", "counterfact"]) == 0 and len(server.requests) == 1  # cached: no second download
    capsys.readouterr()
    assert D.main(["where"]) == 0  # the overview succeeds even with datasets missing
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"counterfact\t{env.data / CF_REL}"
    assert out[1].startswith("zsre\tnot found") and out[2].startswith("wordnet-glosses\tnot found")
    assert D.main(["list"]) == 0
    assert f"counterfact\t{CF_REL}\t{server.url('/counterfact.json')}" in capsys.readouterr().out
    assert D.main(["fetch", "zsre", "--url", server.url("/nope.json")]) == 1
    assert files_under(env.data) == [CF_REL]
    assert D.main(["where", "no-such-dataset"]) == 2


def test_registry_addresses_are_pinned_https():
    for name in ("counterfact", "zsre"):
        spec = D.DATASETS[name]
        assert spec.url.startswith("https://raw.githubusercontent.com/") and spec.url.endswith(spec.relpath.split("/")[-1])
        assert len(spec.url.split("/")[5]) == 40  # a commit, not a branch that can move
