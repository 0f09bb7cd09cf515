"""A plan: what applying a state changes, per section (add / change / remove), and its text.

Both the full reconcile and the delta path build their entries with the methods
below, so the two plans for the same change are equal (tests compare them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import maps as m
from .schema import Backend, Frontend


def frontend_text(fe: Frontend) -> str:
    return f"{fe[0]}:{fe[1]}/{fe[2]}"


def frontend_options(section: str, state, fe: Frontend) -> dict:
    """{option: value} of frontend `fe` of `section` ("services" or "lb_vips") in a DesiredState or a
    Snapshot: every option the section has, as Plan.frontend shows them."""
    if section == "services":
        return {"affinity_timeout": state.affinity.get(fe, 0)}
    return state.lb_options.get(fe, m.LbOptions())._asdict()


def _backends_text(backends: tuple[Backend, ...]) -> list[str]:
    return [f"{b.ip}:{b.port}" for b in backends]


def _fmt(item) -> str:
    if isinstance(item, dict):
        return " ".join(f"{k}={v}" for k, v in item.items())
    return str(item)


@dataclass
class Plan:
    """What applying a state changes, per category: add / change / remove."""

    sections: dict[str, dict[str, list]] = field(default_factory=dict)

    def add(self, section: str, kind: str, item) -> None:
        self.sections.setdefault(section, {"add": [], "change": [], "remove": []})[kind].append(item)

    def frontend(self, section: str, fe: Frontend, want: tuple[Backend, ...] | None,
                 was: tuple[Backend, ...] | None, options: dict | None = None, was_options: dict | None = None) -> None:
        """A service or LB VIP (`section`) added (nothing `was`), removed (nothing wanted) or changed.
        Its options ({name: value}, every option of the section: affinity_timeout, keep_source) are shown
        where they are set, or were."""
        if want is None:
            self.add(section, "remove", {"frontend": frontend_text(fe)})
            return
        entry = {"frontend": frontend_text(fe), "backends": _backends_text(want)}
        if was is not None:
            entry["was"] = _backends_text(was)
        for name, value in (options or {}).items():
            if value or (was_options or {}).get(name):
                entry[name] = value
        self.add(section, "add" if was is None else "change", entry)

    def prefilter(self, added: list[str], removed: list[str]) -> None:
        for cidr in added:
            self.add("prefilter", "add", cidr)
        for cidr in removed:
            self.add("prefilter", "remove", cidr)

    @property
    def changed(self) -> bool:
        return any(v for s in self.sections.values() for v in s.values())

    def to_dict(self) -> dict:
        return {k: v for k, v in self.sections.items() if any(v.values())}

    def render(self) -> str:
        if not self.changed:
            return "No changes: the datapath matches the state."
        lines = []
        for section, kinds in self.to_dict().items():
            lines.append(f"{section}:")
            for kind, sign in (("add", "+"), ("change", "~"), ("remove", "-")):
                lines += [f"  {sign} {_fmt(i)}" for i in kinds[kind]]
        return "\n".join(lines)
