"""The upload page at ``GET /``, driven through a real headless Chromium (Debian's ``chromium``
via playwright, no browser download) against a real server process."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import (
    Browser,
    ConsoleMessage,
    Locator,
    Page,
    Route,
    expect,
    sync_playwright,
)

from tests.harness import ROOT, Server, jpeg_of, serve
from tests.weights import write_test_bundle

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = ROOT / "artifacts"
FAKE_HEIC = b"\x00\x00\x00\x18ftypheic" + b"\x00" * 256
TIMEOUT_MS = 30_000  # two shared cores: a batch can wait behind other work


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, weights_file: Path, model_cache: Path
) -> Iterator[Server]:
    args = ["--weights", str(weights_file), "--cache-dir", str(model_cache), "--offline"]
    with serve(tmp_path_factory.mktemp("web-server"), *args, "--threads", "1") as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: install Debian's chromium "
            "(apt-get install chromium chromium-driver); CI installs it."
        )
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("uploads")
    files = {
        "chelsea.jpg": jpeg_of("chelsea"),
        "coffee.jpg": jpeg_of("coffee"),
        "notes.jpg": b"These are my shopping notes, not a picture.\n" * 20,
        "holiday.heic": FAKE_HEIC,
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return {name: folder / name for name in files}


@contextmanager
def open_page(
    browser: Browser, server: Server, width: int = 1280, height: int = 900
) -> Iterator[Page]:
    """The page loaded with its model info; on leaving, no console errors (CSP violations and
    script errors land there) may have been logged."""
    context = browser.new_context(viewport={"width": width, "height": height})
    problems: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            problems.append(message.text)

    try:
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.on("console", on_console)
        page.on("pageerror", lambda exc: problems.append(str(exc)))
        page.goto(server.url + "/")
        page.locator("#classify-form[data-ready='true']").wait_for()
        yield page
    finally:
        context.close()
    assert problems == [], f"browser console errors: {problems}"


@pytest.fixture
def page(browser: Browser, server: Server) -> Iterator[Page]:
    with open_page(browser, server) as opened:
        yield opened


def percent(score: float) -> str:
    """The page's formatting (JS ``(score * 100).toFixed(1)``: the exact double, ties up)."""
    if 0 < score < 0.0005:
        return "<0.1%"
    return f"{Decimal(score * 100).quantize(Decimal('0.1'), rounding=ROUND_HALF_UP)}%"


def api_batch(server: Server, paths: list[Path], top_k: int) -> list[dict[str, Any]]:
    """What a plain API client gets for the same files, in the same single request."""
    files = [("images", (p.name, p.read_bytes(), "application/octet-stream")) for p in paths]
    response = httpx.post(
        f"{server.url}/classify/batch", params={"top_k": top_k}, files=files, timeout=60
    )
    response.raise_for_status()
    results: list[dict[str, Any]] = response.json()["results"]
    return results


def shown_bars(card: Locator) -> list[tuple[str, str]]:
    labels = card.get_by_test_id("prediction-label").all_inner_texts()
    scores = card.get_by_test_id("prediction-score").all_inner_texts()
    return list(zip(labels, scores, strict=True))


def expected_bars(result: dict[str, Any]) -> list[tuple[str, str]]:
    return [(p["label"], percent(p["score"])) for p in result["predictions"]]


def wait_until_settled(page: Page, count: int) -> Locator:
    """All ``count`` cards are done or failed (none pending or busy)."""
    cards = page.get_by_test_id("card")
    page.wait_for_function(
        """count => {
            const cards = document.querySelectorAll('[data-testid="card"]');
            return cards.length === count &&
                [...cards].every(c => c.dataset.state === 'done' || c.dataset.state === 'error');
        }""",
        arg=count,
        timeout=TIMEOUT_MS,
    )
    return cards


def test_photo_shows_the_apis_top_k_as_bars(
    page: Page, server: Server, photos: dict[str, Path]
) -> None:
    photo = photos["chelsea.jpg"]
    page.get_by_test_id("file-input").set_input_files(photo)
    card = page.get_by_test_id("card")
    assert card.get_by_test_id("card-filename").inner_text() == "chelsea.jpg"
    src = card.locator("img").get_attribute("src")
    assert src is not None
    assert src.startswith("blob:")  # a local preview: nothing is sent before Classify
    page.get_by_role("button", name="Classify").click()
    wait_until_settled(page, 1)

    (expected,) = api_batch(server, [photo], top_k=5)
    assert card.get_attribute("data-state") == "done"
    assert shown_bars(card) == expected_bars(expected)
    assert len(expected["predictions"]) == 5
    assert page.get_by_test_id("status").inner_text() == "Classified 1 image."


def test_several_files_get_a_card_each_in_order(
    page: Page, server: Server, photos: dict[str, Path]
) -> None:
    order = ["chelsea.jpg", "notes.jpg", "coffee.jpg", "holiday.heic"]
    paths = [photos[name] for name in order]
    batch_requests: list[str] = []
    page.on(
        "request",
        lambda r: batch_requests.append(r.url) if "/classify/batch" in r.url else None,
    )
    page.get_by_test_id("file-input").set_input_files(paths)
    page.get_by_label("Top-k").select_option("3")
    page.get_by_role("button", name="Classify").click()
    cards = wait_until_settled(page, 4)
    assert batch_requests == [f"{server.url}/classify/batch?top_k=3"]  # one request for all

    expected = api_batch(server, paths, top_k=3)
    assert cards.get_by_test_id("card-filename").all_inner_texts() == order
    assert [c.get_attribute("data-state") for c in cards.all()] == [
        "done",
        "error",
        "done",
        "error",
    ]
    for card, result in zip(cards.all(), expected, strict=True):
        if result["error"] is None:
            assert shown_bars(card) == expected_bars(result)
        else:
            assert (
                card.get_by_test_id("card-error-detail").inner_text() == result["error"]["detail"]
            )
            assert card.get_by_test_id("predictions").count() == 0
    heic_error = cards.nth(3).get_by_test_id("card-error-detail").inner_text()
    assert "not an image we can read (HEIC)" in heic_error
    assert (
        "not an image we can read" in cards.nth(1).get_by_test_id("card-error-detail").inner_text()
    )
    assert "2 could not be read" in page.get_by_test_id("status").inner_text()
    # Nothing is left to send: unreadable files are not retried.
    assert page.get_by_test_id("classify").get_attribute("aria-disabled") == "true"

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "web-page.png", full_page=True)


def test_keyboard_only(page: Page, server: Server, photos: dict[str, Path]) -> None:
    keyboard = page.keyboard
    # Intercepting file choosers is switched on asynchronously when the first listener comes;
    # listen from the start so the Enter below cannot race it.
    page.on("filechooser", lambda _: None)

    def focused() -> str:
        return str(page.evaluate("document.activeElement.id"))

    for _ in range(10):
        keyboard.press("Tab")
        if focused() == "file-input":
            break
    assert focused() == "file-input", "Tab never reached the file control"
    ring = page.get_by_test_id("dropzone").evaluate("e => getComputedStyle(e).outlineStyle")
    assert ring == "solid", "the focused drop zone shows no focus ring"
    # The OS file dialog cannot be driven headless: Enter opens it, playwright answers it.
    with page.expect_file_chooser() as chooser:
        keyboard.press("Enter")
    assert chooser.value.is_multiple()
    chooser.value.set_files(photos["coffee.jpg"])
    page.get_by_test_id("card").wait_for()

    keyboard.press("Tab")
    assert focused() == "top-k"
    keyboard.press("ArrowUp")  # 5 -> 3
    assert page.get_by_label("Top-k").input_value() == "3"
    keyboard.press("Tab")
    assert focused() == "classify"
    keyboard.press("Enter")
    card = wait_until_settled(page, 1)
    (expected,) = api_batch(server, [photos["coffee.jpg"]], top_k=3)
    assert shown_bars(card) == expected_bars(expected)

    keyboard.press("ArrowDown")  # still on Classify: nothing happens; focus was kept
    assert focused() == "classify"
    keyboard.press("Tab")
    assert focused() == "clear"
    keyboard.press("Space")
    assert page.get_by_test_id("card").count() == 0


def test_footer_and_phone_width(browser: Browser, server: Server, photos: dict[str, Path]) -> None:
    model = httpx.get(f"{server.url}/model").json()
    with open_page(browser, server, width=375, height=800) as page:
        assert page.get_by_test_id("model-precision").inner_text() == "int8"
        assert page.get_by_test_id("model-runtime").inner_text() == "openvino"
        assert page.get_by_test_id("model-weights-source").inner_text() == model["weights_source"]
        assert model["weights_sha256"].startswith(page.get_by_test_id("model-sha").inner_text())
        assert page.get_by_test_id("dev-banner").is_hidden()

        page.get_by_test_id("file-input").set_input_files(list(photos.values()))
        page.get_by_role("button", name="Classify").click()
        wait_until_settled(page, 4)
        width = page.evaluate("document.scrollingElement.scrollWidth")
        assert width <= 375, f"horizontal scroll at phone width: {width}px"
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=ARTIFACTS / "web-page-phone.png", full_page=True)


def test_random_weights_banner(browser: Browser, server: Server) -> None:
    def random_model(route: Route) -> None:
        response = route.fetch()
        body = {**response.json(), "random_weights": True, "weights_source": "random"}
        route.fulfill(response=response, body=json.dumps(body))

    context = browser.new_context()
    try:
        context.route("**/model", random_model)
        page = context.new_page()
        page.goto(server.url + "/")
        banner = page.get_by_test_id("dev-banner")
        banner.wait_for()
        assert "random weights" in banner.inner_text()
        assert "meaningless" in banner.inner_text()
    finally:
        context.close()


def test_paste_adds_a_card(page: Page, photos: dict[str, Path]) -> None:
    data = base64.b64encode(photos["chelsea.jpg"].read_bytes()).decode()
    page.evaluate(
        """data => {
            const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
            const file = new File([bytes], 'pasted.jpg', {type: 'image/jpeg'});
            const clipboard = new DataTransfer();
            clipboard.items.add(file);
            document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: clipboard}));
        }""",
        data,
    )
    card = page.get_by_test_id("card")
    assert card.get_by_test_id("card-filename").inner_text() == "pasted.jpg"
    page.get_by_role("button", name="Classify").click()
    wait_until_settled(page, 1)
    assert card.get_by_test_id("prediction").count() == 5


def test_page_is_served_with_a_csp_and_kept_out_of_the_api_spec(server: Server) -> None:
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "/static/app.js" in page.text
    script = httpx.get(f"{server.url}/static/app.js")
    assert script.status_code == 200
    assert "javascript" in script.headers["content-type"]
    missing = httpx.get(f"{server.url}/static/nope.js")
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"
    spec = httpx.get(f"{server.url}/openapi.json").json()
    assert "/" not in spec["paths"]


def test_model_picker_of_a_repository(
    browser: Browser,
    tmp_path_factory: pytest.TempPathFactory,
    model_cache: Path,
    photos: dict[str, Path],
) -> None:
    """A repository with two models: the page offers both, the bars are the picked model's own
    labels, and the chips its tags (shapes has tag rules, colours none)."""
    root = tmp_path_factory.mktemp("web-repository")
    labels = {"shapes": ["circle", "square", "triangle"], "colours": ["red", "green", "blue"]}
    for seed, (name, names) in enumerate(labels.items()):
        write_test_bundle(root / name / "1", names, name=name, seed=seed)
        (root / name / "config.json").write_text('{"precision": "fp32"}')
    (root / "shapes" / "1" / "tags.yml").write_text(
        "tags:\n"
        "  - {name: round, classes: [circle], threshold: 0.0, priority: 1}\n"
        "  - {name: angular, classes: [square, triangle], threshold: 0.0}\n"
    )
    args = ["--repository", str(root), "--cache-dir", str(model_cache), "--offline"]
    server_dir = tmp_path_factory.mktemp("web-repo-server")
    with serve(server_dir, *args) as server, open_page(browser, server) as page:
        picker = page.get_by_test_id("model")
        assert picker.is_visible()
        options = picker.locator("option").all_inner_texts()
        assert options == ["colours", "shapes"]
        for name in ("shapes", "colours"):
            picker.select_option(name)
            page.locator("#classify-form[data-ready='true']").wait_for()
            if page.get_by_test_id("card").count():
                page.get_by_test_id("clear").click()
            page.get_by_test_id("file-input").set_input_files(photos["chelsea.jpg"])
            page.get_by_role("button", name="Classify").click()
            card = wait_until_settled(page, 1)
            shown = {label for label, _ in shown_bars(card.first)}
            assert shown <= set(labels[name])
            assert len(shown) == 3
            chips = card.first.get_by_test_id("tag").all_inner_texts()
            expected = ["round", "angular"] if name == "shapes" else []
            assert chips == expected  # priority first: round, then angular


def api_explain(server: Server, path: Path, target: str, top_k: int = 5) -> dict[str, Any]:
    """What a plain API client gets from /explain for the same file."""
    response = httpx.post(
        f"{server.url}/explain",
        params={"target": target, "top_k": top_k},
        files={"image": (path.name, path.read_bytes(), "image/jpeg")},
        timeout=60,
    )
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body


def shown_picture(img: Locator) -> dict[str, float]:
    """Where the browser draws the photo's pixels, in CSS pixels: the <img> box, narrowed or
    widened by its object-fit (centred, the default object-position)."""
    box = img.bounding_box()
    assert box is not None
    fit, natural_w, natural_h = img.evaluate(
        "e => [getComputedStyle(e).objectFit, e.naturalWidth, e.naturalHeight]"
    )
    width, height = box["width"], box["height"]
    if fit in ("contain", "cover"):
        pick = min if fit == "contain" else max
        scale = pick(width / natural_w, height / natural_h)
        width, height = natural_w * scale, natural_h * scale
    else:
        assert fit == "fill", f"unexpected object-fit {fit}"
    return {
        "x": box["x"] + (box["width"] - width) / 2,
        "y": box["y"] + (box["height"] - height) / 2,
        "width": width,
        "height": height,
    }


def assert_over_crop_box(overlay: Locator, img: Locator, cam: dict[str, Any]) -> None:
    picture = shown_picture(img)
    sx = picture["width"] / cam["image_width"]
    sy = picture["height"] / cam["image_height"]
    crop = cam["crop_box"]
    expected = {
        "x": picture["x"] + crop["left"] * sx,
        "y": picture["y"] + crop["top"] * sy,
        "width": (crop["right"] - crop["left"]) * sx,
        "height": (crop["bottom"] - crop["top"]) * sy,
    }
    shown = overlay.bounding_box()
    assert shown is not None
    got = {"x": shown["x"], "y": shown["y"], "width": shown["width"], "height": shown["height"]}
    for side, value in expected.items():
        assert abs(got[side] - value) <= 1.5, f"{side}: overlay {shown}, crop box {expected}"


def test_heatmap_overlays_the_crop_the_model_saw(
    page: Page, server: Server, tmp_path: Path
) -> None:
    """A wide photo: the map lies exactly over the centre crop /explain reports (mapped to the
    scaled preview), a bar maps its own class, and the toggle hides the map again."""
    photo = tmp_path / "wide.jpg"
    photo.write_bytes(jpeg_of("chelsea", size=(400, 250)))
    assert httpx.get(f"{server.url}/model").json()["explainable"] is True
    explain_requests: list[str] = []
    page.on("request", lambda r: explain_requests.append(r.url) if "/explain" in r.url else None)
    page.get_by_test_id("file-input").set_input_files(photo)
    page.get_by_role("button", name="Classify").click()
    card = wait_until_settled(page, 1)
    overlay = card.get_by_test_id("heatmap")
    caption = card.get_by_test_id("heatmap-label")
    img = card.get_by_role("img", name="Preview of wide.jpg")
    bars = card.get_by_test_id("prediction-button")
    toggle = card.get_by_label("Show heatmap")
    assert overlay.is_hidden()
    assert explain_requests == []  # nothing is explained before it is asked for

    toggle.check()
    expect(overlay).to_be_visible(timeout=TIMEOUT_MS)
    expect(overlay).to_have_attribute("data-target", re.compile(r"^\d+$"))
    top1 = api_explain(server, photo, "top1")
    cam = top1["cam"]
    assert (cam["image_width"], cam["image_height"]) == (400, 250)
    assert cam["crop_box"]["left"] > 50  # the model saw a centre square, not the whole photo
    assert overlay.get_attribute("data-target") == str(top1["target"]["index"])
    assert top1["target"]["index"] == top1["predictions"][0]["index"]
    assert overlay.get_attribute("src") == "data:image/png;base64," + cam["heatmap_png"]
    first_label = f"Heatmap: {top1['target']['label']} ({percent(top1['target']['score'])})"
    expect(caption).to_have_text(first_label)
    # The PNG decodes (the CSP lets data: images in) and lies over the crop box.
    page.wait_for_function("e => e.complete && e.naturalWidth > 0", arg=overlay.element_handle())
    assert overlay.evaluate("e => e.naturalWidth") == cam["heatmap_size"]
    assert_over_crop_box(overlay, img, cam)
    assert [b.get_attribute("aria-pressed") for b in bars.all()] == ["true"] + ["false"] * 4
    assert explain_requests == [f"{server.url}/explain?target=top1&top_k=5"]

    second = bars.nth(1)
    index = second.get_attribute("data-index")
    assert index is not None
    assert index != str(top1["target"]["index"])
    second.click()
    expect(overlay).to_have_attribute("data-target", index, timeout=TIMEOUT_MS)
    expect(second).to_have_attribute("aria-pressed", "true")
    expect(bars.first).to_have_attribute("aria-pressed", "false")
    other = api_explain(server, photo, index)
    assert other["target"]["index"] == int(index)
    assert other["target"]["label"] == card.get_by_test_id("prediction-label").nth(1).inner_text()
    second_label = f"Heatmap: {other['target']['label']} ({percent(other['target']['score'])})"
    expect(caption).to_have_text(second_label)
    assert second_label != first_label
    src = overlay.get_attribute("src")
    assert src == "data:image/png;base64," + other["cam"]["heatmap_png"]
    assert other["cam"]["heatmap_png"] != cam["heatmap_png"]  # another class, another map
    assert_over_crop_box(overlay, img, other["cam"])
    assert explain_requests[-1] == f"{server.url}/explain?target={index}&top_k=5"

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "web-page-heatmap.png", full_page=True)
    toggle.uncheck()
    expect(overlay).to_be_hidden()
    expect(caption).to_have_text("")
    assert [b.get_attribute("aria-pressed") for b in bars.all()] == ["false"] * 5


def test_no_heatmap_toggle_when_the_model_cannot_explain(
    browser: Browser, server: Server, photos: dict[str, Path]
) -> None:
    def unexplainable(route: Route) -> None:
        response = route.fetch()
        route.fulfill(response=response, body=json.dumps({**response.json(), "explainable": False}))

    context = browser.new_context()
    try:
        context.route("**/model", unexplainable)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(server.url + "/")
        page.locator("#classify-form[data-ready='true']").wait_for()
        page.get_by_test_id("file-input").set_input_files(photos["coffee.jpg"])
        page.get_by_role("button", name="Classify").click()
        card = wait_until_settled(page, 1)
        assert card.get_by_test_id("prediction").count() == 5
        assert card.get_by_label("Show heatmap").count() == 0
        assert card.get_by_test_id("prediction-button").count() == 0  # plain bars, as before
    finally:
        context.close()
