"""How library code reports progress: a small callback interface that the CLI renders."""

from __future__ import annotations


class Progress:
    """Receives progress events; every method is a no-op here, so subclasses override what they show."""

    def begin(self, total: int, title: str) -> None:
        """Work of ``total`` steps (decoder layers) starts."""

    def stage(self, step: int, name: str) -> None:
        """Step ``step`` (0-based) enters stage ``name`` (e.g. ``attention``, ``routing``, ``experts``)."""

    def advance(self, step: int, info: dict | None = None) -> None:
        """Step ``step`` finished; ``info`` holds a short summary."""

    def note(self, text: str) -> None:
        """A one-line message worth showing the user."""

    def end(self) -> None:
        """All work is done (or stopped)."""
