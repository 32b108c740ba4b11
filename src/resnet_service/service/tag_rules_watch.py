"""Tag rules that change while serving (``poll`` mode): each loaded version's rules file is
looked at four times a second; a changed file is read and swapped in whole (requests in flight keep
the rules they started with), a removed one gives the model its default rules back, and a file
that cannot be used is refused once, in the log and in ``/models``, while the rules in force
keep serving. The model itself is not reloaded."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from resnet_service.core.errors import TagRulesInvalid
from resnet_service.core.tag_rules import TagRules
from resnet_service.model.tag_rules_file import default_tag_rules, read_tag_rules
from resnet_service.service.models import ModelTable

log = logging.getLogger("resnet_service.service")

#: How often the rules files are looked at (a stat each): a change shows within a second.
CHECK_S: Final = 0.25

Stamp = tuple[int, int] | None


def _stamp(path: Path | None) -> Stamp:
    """(modification time, size) of the file; None when there is none."""
    if path is None:
        return None
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_size)


@dataclass
class _Watched:
    path: Path | None
    stamp: Stamp
    #: The stamp of a file that was refused: not read again until it changes.
    refused: Stamp = None


class TagRulesWatch:
    """The rules files of one worker's loaded versions, by (model, version)."""

    def __init__(self) -> None:
        self._watched: dict[tuple[str, str], _Watched] = {}

    def loaded(self, name: str, version: str, path: Path | None) -> None:
        """A version was loaded with the rules at ``path`` (or would be, once written)."""
        self._watched[(name, version)] = _Watched(path, _stamp(path))

    def forget(self, name: str, version: str) -> None:
        self._watched.pop((name, version), None)

    def check(self, table: ModelTable) -> None:
        """Swap in the rules of every changed file."""
        for (name, version), watched in list(self._watched.items()):
            entry = table.entry(name, version)
            stamp = _stamp(watched.path)
            if entry is None or entry.classifier is None or stamp == watched.stamp:
                continue
            if stamp is not None and stamp == watched.refused:
                continue
            classifier = entry.classifier
            labels = classifier.own_labels
            rules: TagRules | None
            try:
                if stamp is not None and watched.path is not None:
                    rules = read_tag_rules(watched.path, labels)
                else:
                    rules = default_tag_rules(labels)
            except TagRulesInvalid as exc:
                watched.refused = stamp
                # /models says it without the server's folders: the file is the version's.
                folder = f"{watched.path.parent}/" if watched.path else ""
                classifier.tag_rules_problem = exc.detail.replace(folder, "")
                log.error(
                    "model %s version %s: tag rules kept, the new file is refused: %s",
                    name,
                    version,
                    exc.detail,
                )
                continue
            classifier.tag_rules, classifier.tag_rules_problem = rules, None
            watched.stamp, watched.refused = stamp, None
            log.info(
                "model %s version %s: tag rules now from %s (%d tags)",
                name,
                version,
                rules.source if rules else "nowhere (no tags)",
                len(rules.rules) if rules else 0,
            )
