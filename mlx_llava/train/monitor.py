"""What a run shows: a progress bar while it trains, the loss curve as a PNG after."""


from PIL import Image, ImageDraw

from .. import atomic

WIDTH, HEIGHT, MARGIN = 640, 400, 50


def plot_loss(points, path, title: str = "training loss"):
    """`points`: (step, loss) pairs; later entries for a step win (resumed runs)."""
    points = sorted(dict(points).items())
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    draw.text((MARGIN, 15), title, fill="black")
    left, top, right, bottom = MARGIN, MARGIN, WIDTH - 20, HEIGHT - MARGIN
    draw.rectangle((left, top, right, bottom), outline="black")
    if points:
        steps, losses = zip(*points)
        lo, hi = min(losses), max(losses)
        hi = hi if hi > lo else lo + 1.0
        span = max(steps[-1] - steps[0], 1)
        xy = [(left + (s - steps[0]) / span * (right - left),
               bottom - (l - lo) / (hi - lo) * (bottom - top)) for s, l in points]
        if len(xy) > 1:
            draw.line(xy, fill=(31, 119, 180), width=2)
        else:
            draw.ellipse((xy[0][0] - 2, xy[0][1] - 2, xy[0][0] + 2, xy[0][1] + 2), fill=(31, 119, 180))
        draw.text((5, top - 5), f"{hi:.3g}", fill="black")
        draw.text((5, bottom - 10), f"{lo:.3g}", fill="black")
        draw.text((left, bottom + 8), f"step {steps[0]}", fill="black")
        draw.text((right - 70, bottom + 8), f"step {steps[-1]}", fill="black")
    with atomic.file(path) as tmp:
        image.save(tmp, format="PNG")


class ProgressBar:
    """A rich progress bar with the latest loss (rich comes with typer)."""

    def __init__(self, total: int, done: int = 0, title: str = "training"):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), TextColumn("{task.fields[loss]}"))
        self.task = self.progress.add_task(title, total=total, completed=done, loss="")
        self.progress.start()

    def advance(self, loss=None):
        self.progress.update(self.task, advance=1, loss="" if loss is None else f"loss {loss:.4f}")

    def close(self):
        self.progress.stop()
