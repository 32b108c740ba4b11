"""The README's recipes, run as written, as a new user would run them.

A recipe is a ``###`` section of ``## Try it`` or ``## Recipes``; its ``sh``/``bash`` and
``python`` blocks run in order as one bash script (a python block through a heredoc, each
recipe after ``source .venv/bin/activate`` as the README asks), so that a server one block
starts in the background serves the next. The recipes run in order in one folder (a later one
uses what an earlier one made), beside the service ``make run`` starts, as [Try it] says.

What differs from a user's machine, and only this: seeded random weights (nothing can be
downloaded here), the ports (the README's 8000, 8001, 8010 and 8011 become free ones, and
``localhost`` 127.0.0.1), one worker a server, a repository poll of 1 s instead of 10, and the
bucket of the S3 recipe, which the user has and the test fills (moto's S3 server), and a
``.curlrc`` that makes every curl of the recipes fail on an HTTP error. A block right
after ``<!-- not run: REASON -->`` is skipped with its reason (the Kubernetes one needs a
registry and a cluster). ``json`` blocks are sample output.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from resnet_bench.servers import free_port, stop_process_group
from resnet_service.model.datasets import builtin_photos
from tests.harness import is_ready, wait_until

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
RUN_LANGUAGES = ("sh", "bash", "python")
README_PORTS = (8000, 8001, 8010, 8011)
_FENCE = re.compile(r"^```(\w*)\s*$")
_NOT_RUN = re.compile(r"^<!-- not run: (?P<reason>.+?) -->$")
_PORT = re.compile(r"\b80\d\d\b")


@dataclass(frozen=True)
class Block:
    language: str
    code: str
    line: int  # of the opening fence, 1-based
    not_run: str | None  # the README's reason, or None when it runs


@dataclass(frozen=True)
class Recipe:
    title: str
    blocks: tuple[Block, ...]

    @property
    def runnable(self) -> tuple[Block, ...]:
        return tuple(b for b in self.blocks if b.language in RUN_LANGUAGES and b.not_run is None)

    def script(self, ports: dict[int, int]) -> str:
        """The recipe as one bash script that stops at the first failing command."""
        parts = ["set -eo pipefail", "source .venv/bin/activate"]
        for block in self.runnable:
            if block.language == "python":
                parts.append(f"python - <<'PYTHON'\n{block.code}\nPYTHON")
            else:
                parts.append(block.code)
        text = "\n".join(parts) + "\n"
        text = _PORT.sub(lambda m: str(ports.get(int(m[0]), m[0])), text)
        return text.replace("localhost", "127.0.0.1")


def recipes(text: str, first: str = "## Try it", last: str = "## Reference") -> list[Recipe]:
    """The sections from the ``first`` heading to the ``last`` that hold code blocks."""
    lines = text.splitlines()
    start, end = lines.index(first), lines.index(last)
    found: list[Recipe] = []
    title, blocks = first[3:], list[Block]()
    i = start + 1
    while i < end:
        line = lines[i]
        if line.startswith("### "):
            found.append(Recipe(title, tuple(blocks)))
            title, blocks = line[4:], []
        fence = _FENCE.match(line)
        if fence is None:
            i += 1
            continue
        close = next(j for j in range(i + 1, end) if lines[j].startswith("```"))
        previous = next((lines[j] for j in range(i - 1, start, -1) if lines[j].strip()), "")
        marker = _NOT_RUN.match(previous)
        code = "\n".join(lines[i + 1 : close])
        blocks.append(Block(fence[1], code, i + 1, marker["reason"] if marker else None))
        i = close + 1
    found.append(Recipe(title, tuple(blocks)))
    return [r for r in found if r.blocks]


def test_the_readme_is_parsed_into_the_recipes_it_promises() -> None:
    """The parser sees every recipe the guide lists, each with code that runs (bar Kubernetes),
    and the recipes use only the ports the test maps: a new one would reach a real 80xx port."""
    found = {r.title: r for r in recipes(README.read_text())}
    assert list(found) == [
        "Try it",
        "Classify from a service",
        "Tag a folder or a bucket",
        "Your own classes, end to end",
        "A repository with live versions",
        "Tags people can use",
        "Kubernetes",
        "Open Inference Protocol clients",
    ]
    for title, recipe in found.items():
        if title == "Kubernetes":
            assert not recipe.runnable
            assert all(b.not_run for b in recipe.blocks)
            continue
        assert recipe.runnable, title
        for block in recipe.runnable:
            ports = {int(p) for p in _PORT.findall(block.code)}
            assert ports <= set(README_PORTS), (title, block.line, ports)


@pytest.fixture
def s3_bucket(s3_server: str) -> dict[str, str]:
    """The bucket the S3 recipe reads, my-photos/2026/, on moto's S3 server; its environment."""
    import boto3

    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3_server,
    }
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_server,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    s3.create_bucket(Bucket="my-photos")
    for photo in builtin_photos()[:8]:
        s3.put_object(Bucket="my-photos", Key=f"2026/{photo.name}", Body=photo.read_bytes())
    return env


def _started(args: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """A process in its own group (stopped by group), its output in ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen(
            args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def test_every_recipe_runs_as_written(
    tmp_path: Path, model_cache: Path, s3_bucket: dict[str, str]
) -> None:
    ports = {port: free_port() for port in README_PORTS}
    work = tmp_path / "clone"
    work.mkdir()
    (work / ".venv").symlink_to(ROOT / ".venv")  # the clone's folder, as far as the recipes go
    (tmp_path / ".curlrc").write_text("--fail\n")  # an HTTP error fails the recipe
    env = {
        **os.environ,
        **s3_bucket,
        "PYTHONUNBUFFERED": "1",
        "RESNET_SERVICE_ALLOW_RANDOM_WEIGHTS": "true",
        "RESNET_SERVICE_ALLOW_DOWNLOADS": "false",
        "RESNET_SERVICE_MODEL_CACHE_DIR": str(model_cache),
        "RESNET_SERVICE_WORKERS": "1",
        "RESNET_SERVICE_REPOSITORY_POLL_S": "1",
        "CURL_HOME": str(tmp_path),
    }
    # The README's first command, on the ports the recipes are given.
    make_run = ["make", "--no-print-directory", "run", f"PORT={ports[8000]}"]
    make_run.append(f"GRPC_PORT={ports[8001]}")
    service = _started(make_run, ROOT, env, tmp_path / "make-run.log")
    try:
        url = f"http://127.0.0.1:{ports[8000]}"

        def ready() -> bool:
            assert service.poll() is None, (tmp_path / "make-run.log").read_text()[-3000:]
            return is_ready(url)

        wait_until(ready, 300, "make run")
        for recipe in recipes(README.read_text()):
            if not recipe.runnable:
                continue
            log = tmp_path / f"{re.sub(r'[^a-z]+', '-', recipe.title.lower())}.log"
            shell = _started(["bash", "-c", recipe.script(ports)], work, env, log)
            try:
                code = shell.wait(600)
            finally:
                stop_process_group(shell)  # the shell and its background servers
            output = log.read_text(errors="replace")
            assert code == 0, f"recipe {recipe.title!r} failed ({code}):\n{output[-4000:]}"
        _check_what_the_recipes_made(work)
    finally:
        stop_process_group(service)


def _check_what_the_recipes_made(work: Path) -> None:
    """What the recipes say they make is there: tags of every photo (the copy included), the
    bucket's, the manifest's with embeddings, a fine-tuned bundle, two versions published."""
    import pyarrow.parquet as pq

    def rows(folder: str) -> list[dict[str, Any]]:
        parts = sorted((work / folder).glob("part-*.parquet"))
        assert parts, folder
        table: list[dict[str, Any]] = []
        for part in parts:
            table += pq.read_table(part).to_pylist()
        return table

    photos = len(builtin_photos())
    tags = rows("tags")
    assert len(tags) == photos + 1
    assert all(r["error"] is None for r in tags)
    assert {str(r["path"]).rsplit("/", 1)[-1] for r in tags} >= {"chelsea_copy.jpg"}
    assert len(rows("bucket-tags")) == 8
    listed = rows("listed-tags")
    assert listed
    assert all(len(r["embedding"]) == 512 for r in listed)
    assert (work / "my-model" / "report.json").is_file()
    assert sorted(p.name for p in (work / "models" / "shapes").iterdir()) == ["1", "2"]
