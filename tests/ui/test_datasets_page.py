"""The Datasets page in headless Chromium: images added by drop and by the file picker, removed
into the folder's trash and brought back, captions changed all at once and undone, every note
`dataset check` has on a file shown on it, the buckets of the settings a run trains with, a
transparent image as training sees it, a warning before an edited caption is lost, the folders
`data.dir` may name a few levels down, the page at 800 and 1600 px; and the Caption button: a
captioner from the local model cache captions the images without a caption, the new captions
show for editing with who wrote them, a hand edit is told apart, "all" replaces every caption."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path
from urllib.parse import quote

import pytest
from PIL import Image
from tiny_tagger import cache_tiny_tagger, expected_probabilities
from ui_fixtures import ROOT, UIServer

from stylelora.config import load_config
from stylelora.data.dataset import ImageCaptionDataset
from stylelora.data.report import collect_dataset, data_options

DEMO = ROOT / "datasets" / "demo-style"
RED, BLUE = (255, 0, 0), (0, 0, 255)


def png(size: tuple[int, int], colour=(200, 40, 40), mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, colour).save(out, "PNG")
    return out.getvalue()


def write(folder: Path, files: dict[str, bytes | str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return folder


def transparent_png() -> bytes:
    """64x64, transparent (black where it is) but for an opaque red square in the middle."""
    image = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    image.paste((220, 30, 30, 255), (16, 16, 48, 48))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("datasets-page")
    square = png((64, 64))
    write(root / "upload", {"a.png": square, "a.txt": "a red square"})
    write(root / "removal", {
        "keep.png": square, "keep.txt": "kept",
        "gone.png": square, "gone.txt": "gone", "gone.npz": b"latents",
        "twin.png": square, "twin.jpg": png_as_jpeg(square), "twin.txt": "shared",
    })  # fmt: skip
    write(root / "captions", {
        "1.png": square, "1.txt": "a star, zqx",
        "2.png": square, "2.txt": "zqx, a circle",
        "3.png": square, "3.txt": "a square",
        "4.png": square,
        "5.png": square, "5.txt": "café, a cup".encode("latin-1"),
    })  # fmt: skip
    big = png((512, 512))
    write(root / "checked", {
        "ok.png": big, "ok.txt": "fine",
        "tiny.png": png((16, 16)), "tiny.txt": "tiny",
        "latin.png": big, "latin.txt": "caf\xe9".encode("latin-1"),
        "orphan.txt": "its image was renamed",
        "broken.png": b"not a png",
        "an-image-whose-name-runs-on-and-on-without-a-single-space-in-it-at-all.png": big,
    })  # fmt: skip
    write(root / "alpha", {"clear.png": transparent_png(), "clear.txt": "a red square"})
    write(root / "used", {
        "wide.png": png((256, 128)), "wide.txt": "wide",
        "sq.png": png((128, 128)), "sq.txt": "square",
        "clear.png": transparent_png(), "clear.txt": "clear",
    })  # fmt: skip
    config = {"name": "used", "model": "demo:sd15", "data": {
        "dir": str(root / "used"), "resolution": 128, "bucket_step": 32,
        "alpha_background": [0, 0, 255]}}  # fmt: skip
    write(root / "runs" / "used", {"config.json": json.dumps(config)})
    write(root / "deep" / "er" / "still" / "set", {"x.png": square})
    write(root / "kohya" / "10_dog", {"x.png": square})
    write(root / ".hidden", {"x.png": square})
    write(root / "runs" / "old", {"progress.jsonl": "", "samples/p.png": square})
    red, blue = png((32, 32), RED), png((32, 32), BLUE)
    write(root / "photos", {"red.png": red, "blue.png": blue, "mine.png": red,
                            "mine.txt": "my own words\n"})  # fmt: skip
    return root


def png_as_jpeg(data: bytes) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(out, "JPEG")
    return out.getvalue()


@pytest.fixture(scope="module")
def ui(root, tmp_path_factory):
    # the Caption button's captioner: a tiny tagger as a download leaves it in the model cache
    hub = cache_tiny_tagger(tmp_path_factory.mktemp("hub"))
    env = {"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    server = UIServer(root, root / ".ui", token="t", env=env).start()
    yield server
    server.stop()
    assert "Traceback" not in server.log.read_text()


def open_folder(page, ui, query: str) -> None:
    page.goto(ui.url(f"/datasets?{query}"))
    page.wait_for_selector(".card")


def card(page, name: str):
    return page.locator(".card").filter(has_text=name)


def drop(page, name: str, data: bytes) -> None:
    """A file dropped on the page, as a file manager drops it."""
    transfer = page.evaluate_handle(
        """([name, b64]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type: "image/png" }));
            return transfer;
        }""",
        [name, base64.b64encode(data).decode()],
    )
    page.dispatch_event("#cards", "drop", {"dataTransfer": transfer})


def test_images_are_added_by_drop_and_by_the_file_picker(ui, root, page):
    folder = root / "upload"
    open_folder(page, ui, "path=upload&resolution=64")
    dropped = png((64, 64), (10, 120, 10))
    drop(page, "dropped.png", dropped)
    card(page, "dropped.png").wait_for()
    assert (folder / "dropped.png").read_bytes() == dropped

    # the file picker: one added; a broken image and a type the trainer does not read refused,
    # each in one line naming it
    files = [
        {"name": "picked.JPG", "mimeType": "image/jpeg", "buffer": png_as_jpeg(dropped)},
        {"name": "broken.png", "mimeType": "image/png", "buffer": b"not a png"},
        {"name": "anim.gif", "mimeType": "image/gif", "buffer": b"GIF89a"},
    ]
    page.set_input_files("#files", files=files)
    page.wait_for_function(
        "document.querySelector('#upload-state').textContent.startsWith('added')"
    )
    state = page.inner_text("#upload-state")
    assert state.startswith("added 1 image;"), state
    assert "broken.png: not an image; not added" in state
    assert "'anim.gif': not an image the trainer reads" in state
    card(page, "picked.jpg").wait_for()
    assert not (folder / "broken.png").exists() and not (folder / "anim.gif").exists()

    # the same name again: nothing is replaced unless the user says so
    other = png((64, 64), (10, 10, 200))
    page.once("dialog", lambda dialog: dialog.dismiss())
    drop(page, "dropped.png", other)
    page.get_by_text("dropped.png: not added; the folder's file of that name is kept").wait_for()
    assert (folder / "dropped.png").read_bytes() == dropped
    page.once("dialog", lambda dialog: dialog.accept())
    drop(page, "dropped.png", other)
    page.wait_for_function(
        "document.querySelector('#upload-state').textContent === 'added 1 image'"
    )
    assert (folder / "dropped.png").read_bytes() == other

    # a name is only ever a file name in the folder
    status, reply = ui.call(
        "POST", "/api/dataset/upload?path=upload&name=..%2F..%2Fx%3F.PNG", other
    )
    assert status == 200 and reply["written"] == "upload/x_.png", reply
    assert sorted(p.name for p in folder.iterdir()) == [
        "a.png",
        "a.txt",
        "dropped.png",
        "picked.jpg",
        "x_.png",
    ]  # fmt: skip (and no temporary file left)
    assert page.errors == []


def test_removed_images_go_to_the_trash_with_their_files_and_undo_brings_them_back(ui, root, page):
    folder = root / "removal"
    before = sorted(p.name for p in folder.iterdir())
    open_folder(page, ui, "path=removal&resolution=64")
    for name in ("gone.png", "twin.png"):
        card(page, name).locator(".select").check()
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#remove-selected:has-text('Remove 2 selected')")
    page.get_by_text("moved 4 files into removal/.trash/").wait_for()
    # twin.txt is twin.jpg's caption too: it stays
    assert sorted(p.name for p in folder.iterdir()) == [
        ".trash", "keep.png", "keep.txt", "twin.jpg", "twin.txt"
    ]  # fmt: skip
    (trash,) = (folder / ".trash").iterdir()
    assert sorted(p.name for p in trash.iterdir()) == ["gone.npz", "gone.png", "gone.txt",
                                                       "twin.png"]  # fmt: skip
    assert page.locator(".card").count() == 2  # keep.png, twin.jpg
    assert card(page, "gone.png").count() == 0

    page.click("#undo:has-text('Undo: remove gone.png, twin.png')")
    page.get_by_text("undone: remove gone.png, twin.png (4 files)").wait_for()
    assert sorted(p.name for p in folder.iterdir()) == before
    assert page.locator(".card").count() == 4
    assert page.is_hidden("#undo")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_captions_change_all_at_once_and_undo_restores_every_file(ui, root, page):
    folder = root / "captions"
    before = snapshot(folder)
    open_folder(page, ui, "path=captions&resolution=64")
    page.fill("#trigger", "zqx")
    page.click("#add-trigger")
    done = "add the trigger word 'zqx' at the front: 4 files changed (1 made)"
    page.get_by_text(done).wait_for()
    texts = {name: (folder / name).read_text() for name in ("1.txt", "2.txt", "3.txt", "4.txt")}
    assert texts == {"1.txt": "zqx, a star\n", "2.txt": "zqx, a circle",  # (as it was)
                     "3.txt": "zqx, a square\n", "4.txt": "zqx, captions\n"}  # fmt: skip
    assert (folder / "5.txt").read_text(encoding="utf-8") == "zqx, café, a cup\n"
    assert card(page, "3.png").locator("textarea").input_value() == "zqx, a square"

    page.click("#undo")
    page.get_by_text("undone: add the trigger word 'zqx' at the front (4 files)").wait_for()
    assert snapshot(folder) == before  # the latin-1 file byte for byte, 4.txt gone again

    page.fill("#find", "a star")
    page.fill("#replace", "a big star")
    page.click("#replace-all")
    page.get_by_text("replace 'a star' with 'a big star': 1 file changed").wait_for()
    page.click("#remove-trigger")
    page.get_by_text("remove the trigger word 'zqx': 2 files changed").wait_for()
    assert (folder / "1.txt").read_text() == "a big star\n"
    assert (folder / "2.txt").read_text() == "a circle\n"

    # a caption edited since the last action: undo refuses in one line, and changes nothing
    (folder / "2.txt").write_text("edited by hand\n")
    page.click("#undo")
    refusal = "captions/2.txt: changed since remove the trigger word 'zqx'; undo would lose"
    page.get_by_text(refusal).wait_for()
    assert (folder / "1.txt").read_text() == "a big star\n"
    assert (folder / "2.txt").read_text() == "edited by hand\n"


def test_every_note_dataset_check_has_shows_on_its_file_in_its_words(ui, page):
    open_folder(page, ui, "path=checked")
    report = page.text_content("#report")
    problems = page.inner_text("#problems")
    assert "checked/broken.png: not an image" in problems
    assert "checked/orphan.txt: caption file has no image beside it" in problems
    assert "1 caption file has no image beside it: orphan.txt" in report
    tiny = card(page, "tiny.png").locator(".notes").inner_text()
    assert "upscaled to fit its bucket (x32.0)" in tiny
    assert "1 image upscaled to fit its bucket (x32.0)" in report
    latin = card(page, "latin.png").locator(".notes").inner_text()
    assert "caption file was not UTF-8 and was read as cp1252" in latin
    assert "1 caption file was not UTF-8 and was read as cp1252: latin.txt" in report
    assert card(page, "ok.png").locator(".notes").count() == 0
    assert "data.resolution's default" in page.inner_text("#settings")


def expected_buckets(config: Path) -> dict[str, str]:
    """Each image's bucket as `stylelora train` assigns it from the run's config."""
    cfg = load_config(config)
    scan = collect_dataset(cfg.data)
    dataset = ImageCaptionDataset(scan.records, data_options(cfg.data, cfg.seed))
    return {
        r.path.name: "x".join(map(str, b))
        for r, b in zip(dataset.records, dataset.buckets, strict=True)
    }


def corner_pixel(image) -> list[int]:
    """The top-left pixel of a loaded <img>, as the browser decoded it (RGBA)."""
    image.evaluate("img => img.decode()")
    return image.evaluate(
        """img => {
            const canvas = document.createElement("canvas");
            canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
            const context = canvas.getContext("2d");
            context.drawImage(img, 0, 0);
            return [...context.getImageData(1, 1, 1, 1).data];
        }"""
    )


def test_buckets_follow_the_settings_of_the_run_that_trains_on_the_folder(ui, root, page):
    status, reply = ui.call("POST", "/api/runs/import", {"folder": "runs/used"})
    assert status == 200, reply
    expected = expected_buckets(root / "runs" / "used" / "config.toml")
    assert expected["wide.png"] != "512x256"  # not what the 512 px default gives

    open_folder(page, ui, "path=used")
    for name, bucket in expected.items():
        assert f"→ bucket {bucket}" in card(page, name).inner_text(), name
    assert f"as run {reply['id']} (used) trains this folder" in page.inner_text("#settings")
    # the run's data.alpha_background, as training composites it
    assert corner_pixel(card(page, "clear.png").locator("img")) == [0, 0, 255, 255]

    # a model's usual resolution, offered
    page.click("#settings a:has-text('SDXL: 1024 px')")
    page.wait_for_function("document.querySelector('#settings').textContent.includes('as given')")
    assert "resolution=1024" in page.url
    assert "→ bucket 1024x1024" in card(page, "sq.png").inner_text()
    # the resolution the New run page gives wins
    open_folder(page, ui, "path=used&resolution=64")
    assert "→ bucket 64x64" in card(page, "sq.png").inner_text()


def test_a_transparent_image_shows_as_training_sees_it(ui, page):
    open_folder(page, ui, "path=alpha&resolution=64")
    clear = card(page, "clear.png")
    assert "trained over rgb(255,255,255) (data.alpha_background)" in clear.inner_text()
    # the transparent corner as training sees it: white (data.alpha_background's default)
    assert corner_pixel(clear.locator("img")) == [255, 255, 255, 255]
    clear.locator(".original").check()
    page.wait_for_function("document.querySelector('.card img').src.includes('original=1')")
    assert corner_pixel(clear.locator("img"))[3] == 0  # its transparency, on a checkerboard
    assert "checker" in clear.locator("img").get_attribute("class")


def test_an_edited_caption_is_marked_and_leaving_the_page_warns(ui, root, page):
    open_folder(page, ui, "path=upload&resolution=64")
    area = card(page, "a.png").locator("textarea")
    area.click()
    area.press("End")
    area.press_sequentially(", edited")
    assert "unsaved" in card(page, "a.png").get_attribute("class")
    assert "edited, not written yet" in card(page, "a.png").inner_text()
    with page.expect_event("dialog") as asked:
        page.close(run_before_unload=True)
    assert asked.value.type == "beforeunload"
    asked.value.dismiss()  # stay
    assert (root / "upload" / "a.txt").read_text() == "a red square"
    card(page, "a.png").locator("button").click()
    card(page, "a.png").get_by_text("saved").wait_for()
    assert "unsaved" not in card(page, "a.png").get_attribute("class")
    page.goto(ui.url("/"))  # no warning now: a dialog would stop this navigation
    assert page.url == ui.url("/")
    assert (root / "upload" / "a.txt").read_text() == "a red square, edited\n"


def test_data_dir_suggestions_reach_folders_with_images_a_few_levels_down(ui, page):
    page.goto(ui.url("/datasets"))
    option = "#dataset-folders option[value='deep/er/still/set']"
    page.wait_for_selector(option, state="attached")
    offered = page.eval_on_selector_all("#dataset-folders option", "os => os.map(o => o.value)")
    assert "kohya" in offered and "kohya/10_dog" not in offered  # N_concept: its parent
    assert not [path for path in offered if path.startswith((".", "runs/old"))]
    status, reply = ui.call("GET", "/api/folders?recursive=1")
    assert status == 200
    assert {f["path"]: f["images"] for f in reply["folders"]}["kohya"] == 1
    # the New run page's data.dir offers the same folders
    page.goto(ui.url("/new"))
    page.wait_for_selector("#folders option[value='deep/er/still/set']", state="attached")


@pytest.mark.parametrize("width", [800, 1600])
def test_the_page_fits_its_width(ui, browser, width):
    context = browser.new_context(viewport={"width": width, "height": 900})
    page = context.new_page()
    try:
        open_folder(page, ui, "path=checked")
        card(page, "an-image-whose-name").wait_for()
        fits = "document.documentElement.scrollWidth <= window.innerWidth"
        assert page.evaluate(fits), page.evaluate("document.documentElement.scrollWidth")
    finally:
        context.close()


def test_the_demo_set_lists_as_before(ui, root, page):
    shutil.copytree(DEMO, root / "demo", ignore=shutil.ignore_patterns(".*"))
    open_folder(page, ui, "path=demo&resolution=64")
    assert page.locator(".card").count() == 24
    assert page.locator(".card .notes").count() == 0


def test_uploads_removals_and_caption_changes_stay_inside_the_roots(ui, root, tmp_path):
    outside = write(tmp_path / "outside", {"x.png": png((8, 8)), "x.txt": "secret"})
    (root / "link-out").symlink_to(outside)
    before = snapshot(outside)
    square = png((64, 64))
    for query in ("path=..%2F&name=a.png", "path=link-out&name=a.png",
                  f"path={quote(str(outside))}&name=a.png", "path=upload&name=a%00.png",
                  "path=upload&name=.png", "path=upload/a.png&name=b.png"):  # fmt: skip
        status, reply = ui.call("POST", f"/api/dataset/upload?{query}", square)
        assert 400 <= status < 500 and "\n" not in reply["error"], (query, reply)
    for folder, paths in (("removal", ["link-out/x.png"]), ("removal", [str(outside / "x.png")]),
                          ("link-out", ["link-out/x.png"]), ("removal", ["upload/a.png"]),
                          ("removal", ["removal/.."]), ("removal", "keep.png")):  # fmt: skip
        status, reply = ui.call("POST", "/api/dataset/remove", {"folder": folder, "paths": paths})
        assert 400 <= status < 500 and "\n" not in reply["error"], (folder, paths, reply)
    body = {"path": "link-out", "action": "add_trigger", "word": "zqx"}
    assert ui.call("POST", "/api/dataset/captions", body)[0] == 403
    assert ui.call("POST", "/api/dataset/undo", {"path": "link-out"})[0] == 403
    assert snapshot(outside) == before
    assert (root / "removal" / "keep.png").is_file() and (root / "upload" / "a.png").is_file()


# --- the Caption button -----------------------------------------------------------------------


def top_tag(rgb) -> str:
    """The tagger's most confident kept tag on a solid image of `rgb`, by its formula."""
    kept = {"red_background": 0.35, "blue_theme": 0.35, "kirisame_marisa": 0.85}
    probabilities = expected_probabilities(rgb)
    best = max((p, name) for name, p in probabilities.items() if p >= kept.get(name, 2))
    return best[1].replace("_", " ")


def caption_of(page, name: str) -> str:
    return page.input_value(f".card[data-path='photos/{name}'] textarea")


def author_of(page, name: str) -> str:
    return page.text_content(f".card[data-path='photos/{name}'] .author") or ""


def test_a_folder_is_captioned_from_the_page_and_the_captions_are_edited(ui, page):
    page.goto(ui.url("/datasets?path=photos"))
    page.wait_for_selector(".card[data-path='photos/red.png']")
    page.locator("#captioners-note").filter(has_text="1 captioner in the local").wait_for()
    assert page.input_value("#cap-model") == "tiny/wd-tagger"
    page.fill("#cap-trigger", "zqxstyle")
    page.click("#caption-start")
    page.locator("#caption-state").filter(has_text="done: 2 written").wait_for()
    assert "1 skipped" in page.text_content("#caption-state")
    # the new captions are in the cards, as the files hold them
    red = caption_of(page, "red.png")
    assert red.startswith(f"zqxstyle, {top_tag(RED)}, ")
    assert red == (ui.root / "photos" / "red.txt").read_text().strip()
    assert caption_of(page, "blue.png").startswith(f"zqxstyle, {top_tag(BLUE)}, ")
    assert caption_of(page, "mine.png") == "my own words"
    assert author_of(page, "red.png") == "captioned by WD tagger (tiny/wd-tagger)"
    assert page.locator(".card[data-path='photos/mine.png'] .author").count() == 0
    # an edit by hand is told apart from the captioner's text
    card = page.locator(".card[data-path='photos/blue.png']")
    card.locator("textarea").fill("zqxstyle, a blue square")
    card.locator("button", has_text="Save").click()
    card.locator(".state", has_text="saved").wait_for()
    page.reload()
    page.wait_for_selector(".card[data-path='photos/blue.png'] .author")
    assert author_of(page, "blue.png") == "captioned by a model, edited by hand since"
    # "all" replaces every caption, after a confirmation
    assert page.input_value("#cap-trigger") == ""  # a reload forgets it: none this time
    page.check("#cap-all")
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#caption-start")
    page.locator("#caption-state").filter(has_text="done: 3 written").wait_for()
    page.wait_for_function(
        "document.querySelector(\".card[data-path='photos/mine.png'] textarea\").value"
        f".startsWith('{top_tag(RED)}, ')"
    )
    assert author_of(page, "blue.png") == "captioned by WD tagger (tiny/wd-tagger)"


@pytest.mark.parametrize(
    ("change", "status", "said"),
    [
        ({"model": "../../etc"}, 403, "outside"),
        ({"model": "nobody/not-cached"}, 200, "not in the local cache"),
        ({"trigger": "two\nlines"}, 400, "trigger: one line"),
        ({"style": "poetry"}, 400, "style: natural, tags"),
        ({"caption_extension": ".png"}, 400, "caption_extension"),
        ({"path": "../.."}, 403, "outside"),
        ({"path": ""}, 400, "path: open the folder"),
    ],
)
def test_hostile_caption_requests_get_one_line(ui, change, status, said):
    request = {"path": "photos", "model": "tiny/wd-tagger", **change}
    code, reply = ui.call("POST", "/api/caption/start", request)
    assert code == status, reply
    if code == 200:  # started: the command itself refuses, in one line
        while reply["state"] == "running":
            _, reply = ui.call("GET", "/api/caption/status")
        assert reply["state"] == "failed" and said in reply["error"], reply
        assert not re.search(r"Traceback|File \"", reply["error"])
    else:
        assert said in reply["error"], reply
    assert not Path(ui.root / "photos" / "red.png").with_suffix(".png.txt").exists()
