"""The nodes' help pages (web/docs/<NodeClass>.md, what ComfyUI's node help panel shows): one per node, as the
generator renders them from the nodes' declarations, and every picture they show is there.

After changing a node's description, inputs or outputs: ``python -m comfyui_finetune.nodes.help_pages``."""
from __future__ import annotations

import re

import pytest

from comfyui_finetune.nodes import NODES, help_pages

DOCS = help_pages.DOCS
IDS = [cls.__name__ for cls, _ in NODES]  # what NODES holds here (some nodes register only inside ComfyUI)
IMAGE_LINK = re.compile(r"!\[[^\]]*\]\(([^)\s]+)[^)]*\)|<img[^>]*\ssrc=['\"]([^'\"]+)['\"]")


@pytest.fixture(scope="module")
def rendered():
    return help_pages.pages()


def test_every_node_has_a_page():
    missing = [n for n in IDS if not (DOCS / f"{n}.md").is_file()]
    assert not missing, f"no help page for {missing}: run python -m comfyui_finetune.nodes.help_pages"


@pytest.mark.parametrize("node", IDS)
def test_page_is_what_the_generator_renders(node, rendered):
    """A committed page that differs from its node's declarations is stale: regenerate the pages."""
    assert (DOCS / f"{node}.md").read_text(encoding="utf-8") == rendered[f"{node}.md"], (
        f"web/docs/{node}.md is stale: run python -m comfyui_finetune.nodes.help_pages")


def test_pictures_are_copies_of_their_sources():
    for rel, source in help_pages.pictures().items():
        assert (DOCS / rel).read_bytes() == source.read_bytes(), f"web/docs/{rel} differs from docs/{source.name}"


def test_every_image_link_points_to_a_file_the_server_serves():
    """The front end resolves a relative picture against /extensions/<pack>/docs/, which serves web/docs/: a link
    must be relative and stay inside it."""
    pages = sorted(DOCS.glob("*.md"))
    assert pages
    for page in pages:
        for m in IMAGE_LINK.finditer(page.read_text(encoding="utf-8")):
            link = m[1] or m[2]
            assert not link.startswith(("/", "http:", "https:")), f"{page.name}: {link} must be relative to web/docs"
            target = (DOCS / link).resolve()
            assert DOCS.resolve() in target.parents and target.is_file(), f"{page.name}: {link} is not in web/docs"


def test_training_nodes_have_their_sections_and_pictures_exist(rendered):
    trainers = [n for n in IDS if n.startswith("FT_Train")]
    assert trainers
    for node in trainers:
        assert node in help_pages.EXTRA, f"{node} has no hand-written sections in help_pages.EXTRA"
        assert "## First settings" in rendered[f"{node}.md"]
    for file, _ in help_pages.PICTURES.values():
        assert (help_pages.PICTURE_SOURCE / file).is_file()


def test_web_docs_holds_no_script():
    """Every .js under the web directory is loaded into the page as an extension."""
    assert not list(DOCS.rglob("*.js"))


def test_page_shows_inputs_outputs_and_escapes_markup(rendered):
    page = rendered["FT_TrainTextualInversion.md"]
    assert "| `token` | STRING | `<my-concept>` |" in page  # a default shown as code, not swallowed as a tag
    assert "e.g. &lt;my-cat&gt;" in page
    assert "| `embedding` | `FT_EMBEDDING` |" in page
    assert "*optional, advanced*" in page
    assert help_pages._escape("~1e-4 or ~1e-3 | <b> `a <b>`", table=True) == "\\~1e-4 or \\~1e-3 \\| &lt;b&gt; `a <b>`"


def test_folder_lists_are_not_the_machines_files(rendered):
    """Choices read from a model or input folder show the built-in entries only, with a note."""
    page = rendered["FT_LoadBaseModel.md"]
    row = next(line for line in page.splitlines() if line.startswith("| `model_name`"))
    assert ("`toy (built-in)`, `toy SDXL (built-in)`, `toy audio (built-in)`, `toy Z-Image (built-in)`, then the "
            "files or folders ComfyUI finds") in row


def test_extra_nodes_get_pages():
    class FT_Probe:
        DESCRIPTION = "A probe."
        CATEGORY = "finetune/test"
        RETURN_TYPES = ("INT",)

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"n": ("INT", {"default": 2, "min": 0, "max": 9, "tooltip": "How many."})}}

    pages = help_pages.pages(extra=[(FT_Probe, "Probe")])
    assert "| `n` | INT | 2 | 0 – 9 | How many. |" in pages["FT_Probe.md"]
    assert pages["FT_Probe.md"].startswith("# Probe\n")
