"""core-lite's raw data from its real source: the bigbench 1.0.0 sdist on a PyPI-shaped index (a real HTTP
server on 127.0.0.1 serving the JSON API and a small sdist built here from synthetic task.json files),
downloaded once and cached; a damaged download, a missing release, transient errors; the local override."""

import hashlib
import io
import json
import tarfile
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from nanoray.core_data import bigbench
from nanoray.core_data.bundle import BundleUnavailable, ensure_core_lite, read_items, read_specs, resolve_tasks

API = f"/pypi/bigbench/{bigbench.RELEASE}/json"
SDIST = f"/packages/source/b/bigbench/bigbench-{bigbench.RELEASE}.tar.gz"
LICENSE = b"Apache License, Version 2.0 (stand-in)\n"


def synthetic_task(path: str) -> dict:
    """A small task.json in BIG-bench's shape: 12 examples, LM targets or (language_identification) scores."""
    if path.startswith("language_identification"):
        langs = ["English", "French", "German"]
        return {"name": "language_identification", "examples": [
            {"input": f"sentence {i}", "target_scores": {lang: int(j == i % 3) for j, lang in enumerate(langs)}}
            for i in range(12)]}
    return {"name": path, "example_input_prefix": "\nIn: ", "examples": [
        {"input": f"{path} {i}", "target": [f"answer {i}"]} for i in range(12)]}


TASKS = {path: synthetic_task(path) for path in bigbench.TASK_FILES}


def tar_of(files: dict[str, bytes], mode: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def sdist_bytes() -> bytes:
    """Laid out as a setuptools sdist: a top folder bigbench-1.0.0/ with the package and its task data."""
    top = f"bigbench-{bigbench.RELEASE}/"
    files = {top + "PKG-INFO": b"Name: bigbench\n", top + "LICENSE": LICENSE, top + "bigbench/__init__.py": b"",
             top + "bigbench/benchmark_tasks/other_task/task.json": b'{"examples": []}'}
    files |= {top + bigbench.IN_SDIST + path: json.dumps(task).encode() for path, task in TASKS.items()}
    return tar_of(files, "w:gz")


class Index:
    """A PyPI-shaped index on 127.0.0.1: routes (path -> body), queued failure statuses per path, hits."""

    def __init__(self):
        self.routes, self.failures, self.hits = {}, {}, Counter()
        index = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                index.hits[self.path] += 1
                if index.failures.get(self.path):
                    status, body = index.failures[self.path].pop(0), b"busy"
                elif self.path in index.routes:
                    status, body = 200, index.routes[self.path]
                else:
                    status, body = 404, b"not found"
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def publish(self, sdist: bytes, sha256: str | None = None) -> None:
        """The release's JSON document (a wheel listed before the sdist) and the sdist itself."""
        files = [{"packagetype": "bdist_wheel", "url": f"{self.url}/packages/bigbench-1.0.0-py3-none-any.whl",
                  "digests": {"sha256": "0" * 64}},
                 {"packagetype": "sdist", "url": self.url + SDIST,
                  "digests": {"sha256": sha256 or hashlib.sha256(sdist).hexdigest()}}]
        doc = {"info": {"name": "bigbench", "version": bigbench.RELEASE}, "urls": files}
        self.routes[API] = json.dumps(doc).encode()
        self.routes[SDIST] = sdist


@pytest.fixture
def index(monkeypatch):
    monkeypatch.delenv("NANORAY_BIGBENCH_DIR", raising=False)  # the download path, whatever the session set
    monkeypatch.delenv("NANORAY_PYPI_URL", raising=False)
    index = Index()
    yield index
    index.server.shutdown()
    index.server.server_close()


def no_sleep(seconds):
    raise AssertionError(f"slept {seconds} s: a retry where none was expected")


def test_downloaded_once_then_served_from_cache(index, tmp_path, monkeypatch, capsys):
    index.publish(sdist_bytes())
    monkeypatch.setattr(bigbench, "PROGRESS_S", 0)  # a progress line for every chunk
    cache = tmp_path / "cache"
    assert bigbench.local_data(cache) is None
    raw = bigbench.ensure_raw(cache, index.url, sleep=no_sleep)
    assert raw == cache / bigbench.CACHE_NAME == bigbench.local_data(cache)
    assert sorted(str(p.relative_to(raw)) for p in raw.rglob("*") if p.is_file()) == \
        sorted(bigbench.TASK_FILES + ["LICENSE", "source.json"])  # only what core-lite reads: not other_task
    assert (raw / "LICENSE").read_bytes() == LICENSE
    assert json.loads((raw / "source.json").read_text())["sha256"] == hashlib.sha256(index.routes[SDIST]).hexdigest()
    assert bigbench.read_tasks(raw) == TASKS
    assert [p.name for p in cache.iterdir()] == [bigbench.CACHE_NAME]  # the sdist and temp folders are gone
    assert index.hits == {API: 1, SDIST: 1}
    assert "bigbench sdist: 0.0 of 0.0 MB" in capsys.readouterr().err
    assert bigbench.ensure_raw(cache, index.url, sleep=no_sleep) == raw
    assert index.hits == {API: 1, SDIST: 1}  # the second time from the cache, no request


def test_damaged_download_is_refused_and_removed(index, tmp_path):
    sdist = sdist_bytes()
    index.publish(sdist, sha256="ab" * 32)
    cache = tmp_path / "cache"
    with pytest.raises(ValueError) as e:
        bigbench.ensure_raw(cache, index.url, sleep=no_sleep)
    assert index.url + SDIST in str(e.value) and "ab" * 32 in str(e.value)
    assert hashlib.sha256(sdist).hexdigest() in str(e.value)
    assert list(cache.iterdir()) == [] and bigbench.local_data(cache) is None  # nothing kept, nothing cached


def test_missing_release_is_a_clear_error_without_retries(index, tmp_path):
    with pytest.raises(LookupError, match=f"bigbench {bigbench.RELEASE} is not on the index {index.url}"):
        bigbench.ensure_raw(tmp_path / "cache", index.url, sleep=no_sleep)
    assert index.hits == {API: 1}
    # through the task-set name, as a job or the CORE route asks: BundleUnavailable says what to set
    with pytest.raises(BundleUnavailable) as e:
        ensure_core_lite(tmp_path / "cache", index_url=index.url, sleep=no_sleep)
    assert "NANORAY_BIGBENCH_DIR" in str(e.value) and "NANORAY_PYPI_URL" in str(e.value)
    assert "404" in str(e.value) and index.url in str(e.value)
    index.failures = {API: [403]}  # refused (a proxy, a private index): asking again would not help either
    with pytest.raises(bigbench.Refused, match="HTTP 403"):
        bigbench.ensure_raw(tmp_path / "cache", index.url, sleep=no_sleep)
    assert index.hits == {API: 3}


def test_an_index_without_the_sdist_or_without_the_tasks(index, tmp_path):
    index.publish(sdist_bytes())
    doc = json.loads(index.routes[API])
    index.routes[API] = json.dumps({"urls": doc["urls"][:1]}).encode()  # the wheel only
    with pytest.raises(LookupError, match="no source distribution"):
        bigbench.ensure_raw(tmp_path / "a", index.url, sleep=no_sleep)
    index.publish(tar_of({"bigbench-1.0.0/PKG-INFO": b"Name: bigbench\n"}, "w:gz"))  # 0.0.1-like: no task data
    with pytest.raises(ValueError, match="it lacks .*bigbench/benchmark_tasks/qa_wikidata/task.json"):
        bigbench.ensure_raw(tmp_path / "b", index.url, sleep=no_sleep)
    assert list((tmp_path / "b").iterdir()) == []


def test_transient_errors_are_retried_with_backoff(index, tmp_path):
    index.publish(sdist_bytes())
    index.failures = {API: [503], SDIST: [500, 503]}
    slept = []
    raw = bigbench.ensure_raw(tmp_path / "cache", index.url, sleep=slept.append)
    assert bigbench.read_tasks(raw) == TASKS
    assert index.hits == {API: 2, SDIST: 3} and slept == [2, 2, 4]


def test_the_override_needs_no_network(index, tmp_path, monkeypatch):
    unpacked = tmp_path / "unpacked"
    for path, task in TASKS.items():
        (unpacked / path).parent.mkdir(parents=True, exist_ok=True)
        (unpacked / path).write_text(json.dumps(task))
    packed = tmp_path / "packed"
    packed.mkdir()  # shaped like the shared tarball: ./<task>/task.json
    (packed / bigbench.TARBALL).write_bytes(tar_of({f"./{p}": json.dumps(t).encode() for p, t in TASKS.items()},
                                                   "w:xz"))
    for folder in (unpacked, packed):
        monkeypatch.setenv("NANORAY_BIGBENCH_DIR", str(folder))
        assert bigbench.local_data(tmp_path / "cache") == folder
        assert bigbench.read_tasks(bigbench.ensure_raw(tmp_path / "cache", index.url, sleep=no_sleep)) == TASKS
    monkeypatch.setenv("NANORAY_BIGBENCH_DIR", str(tmp_path / "empty"))
    with pytest.raises(BundleUnavailable, match="lacks qa_wikidata/task.json"):
        ensure_core_lite(tmp_path / "cache", index_url=index.url)
    assert not index.hits


def test_core_lite_from_the_download_equals_the_one_from_the_override(index, tmp_path, monkeypatch):
    index.publish(sdist_bytes())
    monkeypatch.setenv("NANORAY_PYPI_URL", index.url)
    monkeypatch.setenv("NANORAY_CACHE", str(tmp_path / "downloaded"))
    downloaded = resolve_tasks("core-lite")  # the job's way: the cache and the index from the environment
    assert index.hits == {API: 1, SDIST: 1}
    monkeypatch.setenv("NANORAY_BIGBENCH_DIR", str(tmp_path / "downloaded" / bigbench.CACHE_NAME))
    local = ensure_core_lite(tmp_path / "local")
    files = sorted(str(p.relative_to(downloaded)) for p in downloaded.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    assert all((downloaded / f).read_bytes() == (local / f).read_bytes() for f in files)
    specs = read_specs(downloaded)
    assert [s.label for s in specs] == list(bigbench.TASKS)
    items = {s.label: read_items(s) for s in specs}
    assert len(items["bigbench_cs_algorithms"]) == 24 and items["bigbench_qa_wikidata"][3] == \
        {"context": "In: qa_wikidata/task.json 3\nA:", "continuation": "answer 3"}
    assert items["bigbench_language_identification"][4]["gold"] == 1
    assert index.hits == {API: 1, SDIST: 1}
