"""Tag rules as a team writes them: a YAML file beside the model (``tags.yml`` in a bundle, a
built model or a repository version, versioned with it), checked against the model's labels
and compiled to ``core.tag_rules.TagRules``. An error names the file, the line and what to fix.

A rule's ``classes`` may name a class label, a class index, a group the file defines
(``groups:``, a hierarchy of the team's own) or, for a model with ImageNet's 1,000 labels, a
WordNet node (``dog.n.01``) that stands for every ImageNet class below it. The hierarchy is
data in the package (``tag_data/imagenet_hierarchy.json``, made by
``scripts/imagenet_hierarchy.py``; its provenance is in the file); so is the default rule set
for the ImageNet model (``tag_data/imagenet_tags.yml``).

Hand-written line lookup: pydantic reports where in the data an error is, PyYAML's node tree
where that data sits in the text; nothing joins the two.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any, Final, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from resnet_service.config import Settings
from resnet_service.core.errors import TagRulesInvalid
from resnet_service.core.tag_rules import TagRule, TagRules

RULES_FILE: Final = "tags.yml"
_DATA: Final = Path(__file__).resolve().parent / "tag_data"
_HIERARCHY: Final = _DATA / "imagenet_hierarchy.json"
IMAGENET_RULES: Final = _DATA / "imagenet_tags.yml"


class TagSpec(BaseModel):
    """One tag as written."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100)
    classes: list[str | int] = Field(min_length=1)
    threshold: float = Field(0.5, ge=0, le=1)
    priority: int = Field(0, ge=-1000, le=1000)
    categories: list[str] = []
    aliases: list[str] = []


class RulesFile(BaseModel):
    """A rules file as written."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    floor: float = Field(
        0.0, ge=0, le=1, description="No tag scores below this, whatever its own threshold."
    )
    max_tags: int = Field(5, ge=1, le=100, description="At most this many tags an image.")
    groups: dict[str, list[str | int]] = Field(
        default_factory=dict, description="Named sets of classes the tags may name."
    )
    tags: list[TagSpec] = Field(min_length=1)


class Hierarchy:
    """ImageNet-1k's classes under WordNet's nouns: which classes lie below a node."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.labels: list[str] = [c["label"] for c in document["classes"]]
        parents: dict[str, list[str]] = {n: v["parents"] for n, v in document["nodes"].items()}
        self.below: dict[str, list[int]] = {}
        for index, cls in enumerate(document["classes"]):
            seen: set[str] = set()
            pending = [cls["synset"]]
            while pending:
                node = pending.pop()
                if node not in seen:
                    seen.add(node)
                    pending.extend(parents[node])
            for node in seen:
                self.below.setdefault(node, []).append(index)


@cache
def imagenet_hierarchy() -> Hierarchy:
    return Hierarchy(json.loads(_HIERARCHY.read_text()))


def _is_imagenet(labels: Sequence[str]) -> bool:
    return len(labels) == 1000 and list(labels) == imagenet_hierarchy().labels


def _line_of(root: yaml.Node | None, loc: Sequence[str | int]) -> int | None:
    """The 1-based line of the value at ``loc`` (pydantic's error path) in the YAML tree."""
    node, line = root, None
    for part in loc:
        if node is None:
            break
        line = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == part), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            node = node.value[part] if part < len(node.value) else None
        else:
            node = None
    return node.start_mark.line + 1 if node is not None else line


def parse_tag_rules(text: str, labels: Sequence[str], source: str) -> TagRules:
    """Check ``text`` against the model's ``labels`` and compile it; ``TagRulesInvalid`` names
    ``source``, the line and the reason."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise TagRulesInvalid(f"{source}{where}: not YAML ({exc.problem})") from None
    try:
        spec = RulesFile.model_validate(data if data is not None else {})
    except ValidationError as exc:
        first = exc.errors()[0]
        line = _line_of(root, first["loc"])
        field = ".".join(str(p) for p in first["loc"]) or "the file"
        where = f" line {line}" if line else ""
        raise TagRulesInvalid(f"{source}{where}: {field}: {first['msg']}") from None
    return _compile(spec, root, labels, source)


def _compile(
    spec: RulesFile, root: yaml.Node | None, labels: Sequence[str], source: str
) -> TagRules:
    index = {label: i for i, label in enumerate(labels)}
    hierarchy = imagenet_hierarchy() if _is_imagenet(labels) else None

    def refuse(loc: tuple[str | int, ...], why: str) -> TagRulesInvalid:
        line = _line_of(root, loc)
        return TagRulesInvalid(f"{source}{f' line {line}' if line else ''}: {why}")

    def resolve(ref: str | int, loc: tuple[str | int, ...], groups: bool) -> list[int]:
        if isinstance(ref, int):
            if 0 <= ref < len(labels):
                return [ref]
            raise refuse(loc, f"class index {ref} is outside 0..{len(labels) - 1}")
        if ref in index:
            return [index[ref]]
        if groups and ref in spec.groups:
            return group_members[ref]
        if hierarchy is not None and ref in hierarchy.below:
            return hierarchy.below[ref]
        kinds = ["a class label of this model"]
        kinds += ["a group of this file"] if groups else []
        kinds += ["an ImageNet WordNet node (like dog.n.01)"] if hierarchy else []
        what = " or ".join([", ".join(kinds[:-1]), kinds[-1]] if len(kinds) > 1 else kinds)
        if hierarchy is None and ".n." in ref:
            what += " (WordNet nodes name ImageNet's classes; this model has other labels)"
        raise refuse(loc, f"{ref!r} is not {what}")

    group_members: dict[str, list[int]] = {}
    for name, refs in spec.groups.items():
        members = [
            i for n, ref in enumerate(refs) for i in resolve(ref, ("groups", name, n), False)
        ]
        group_members[name] = sorted(set(members))
    rules: list[TagRule] = []
    seen: set[str] = set()
    for t, tag in enumerate(spec.tags):
        if tag.name in seen:
            raise refuse(("tags", t, "name"), f"tag {tag.name!r} is defined twice")
        seen.add(tag.name)
        classes = {
            i
            for c, ref in enumerate(tag.classes)
            for i in resolve(ref, ("tags", t, "classes", c), True)
        }
        rules.append(
            TagRule(
                name=tag.name,
                classes=tuple(sorted(classes)),
                threshold=tag.threshold,
                priority=tag.priority,
                categories=tuple(tag.categories),
                aliases=tuple(tag.aliases),
            )
        )
    return TagRules(rules, len(labels), floor=spec.floor, max_tags=spec.max_tags, source=source)


def read_tag_rules(path: Path, labels: Sequence[str]) -> TagRules:
    """The rules in ``path`` for a model with ``labels``."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TagRulesInvalid(f"{path}: cannot be read ({exc})") from None
    return parse_tag_rules(text, labels, str(path))


def default_tag_rules(labels: Sequence[str]) -> TagRules | None:
    """The package's rules for a model with ImageNet's labels; None for any other model."""
    if not _is_imagenet(labels):
        return None
    return parse_tag_rules(IMAGENET_RULES.read_text(encoding="utf-8"), labels, "imagenet_tags.yml")


def rules_location(settings: Settings) -> Path | None:
    """Where the served model's rules file is, or would be once written: the file the settings
    name, else ``tags.yml`` beside the model (its bundle, built model or weights file)."""
    if settings.tag_rules is not None:
        return settings.tag_rules
    weights = settings.weights_path.parent if settings.weights_path else None
    folder = settings.bundle_path or settings.artifact_path or weights
    return folder / RULES_FILE if folder is not None else None


def tag_rules_for(settings: Settings, labels: Sequence[str]) -> TagRules | None:
    """The rules the served model starts with: its file, else the package's for ImageNet."""
    if not settings.tags:
        return None
    path = rules_location(settings)
    if path is not None and path.is_file():
        return read_tag_rules(path, labels)
    return default_tag_rules(labels)
