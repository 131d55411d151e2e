"""Line charts written as PNG files with numpy and zlib alone (no plotting library needed).

Enough for the experiments' figures: axes with ticks, lines with markers, a
title, axis labels and a legend, in a 3x5 pixel font drawn twice as large.
"""

import struct
import zlib

import numpy as np

_GLYPHS = {
    "0": "###,#.#,#.#,#.#,###", "1": ".#.,##.,.#.,.#.,###", "2": "###,..#,###,#..,###",
    "3": "###,..#,.##,..#,###", "4": "#.#,#.#,###,..#,..#", "5": "###,#..,###,..#,###",
    "6": "###,#..,###,#.#,###", "7": "###,..#,..#,.#.,.#.", "8": "###,#.#,###,#.#,###",
    "9": "###,#.#,###,..#,###", "A": ".#.,#.#,###,#.#,#.#", "B": "##.,#.#,##.,#.#,##.",
    "C": ".##,#..,#..,#..,.##", "D": "##.,#.#,#.#,#.#,##.", "E": "###,#..,##.,#..,###",
    "F": "###,#..,##.,#..,#..", "G": ".##,#..,#.#,#.#,.##", "H": "#.#,#.#,###,#.#,#.#",
    "I": "###,.#.,.#.,.#.,###", "J": "..#,..#,..#,#.#,.#.", "K": "#.#,#.#,##.,#.#,#.#",
    "L": "#..,#..,#..,#..,###", "M": "#.#,###,###,#.#,#.#", "N": "##.,#.#,#.#,#.#,#.#",
    "O": ".#.,#.#,#.#,#.#,.#.", "P": "##.,#.#,##.,#..,#..", "Q": ".#.,#.#,#.#,##.,.##",
    "R": "##.,#.#,##.,#.#,#.#", "S": ".##,#..,.#.,..#,##.", "T": "###,.#.,.#.,.#.,.#.",
    "U": "#.#,#.#,#.#,#.#,###", "V": "#.#,#.#,#.#,#.#,.#.", "W": "#.#,#.#,###,###,#.#",
    "X": "#.#,#.#,.#.,#.#,#.#", "Y": "#.#,#.#,.#.,.#.,.#.", "Z": "###,..#,.#.,#..,###",
    ".": "...,...,...,...,.#.", "-": "...,...,###,...,...", "%": "#.#,..#,.#.,#..,#.#",
    "(": ".#.,#..,#..,#..,.#.", ")": ".#.,..#,..#,..#,.#.", ",": "...,...,...,.#.,#..",
    "=": "...,###,...,###,...", ":": "...,.#.,...,.#.,...", "/": "..#,..#,.#.,#..,#..",
    "_": "...,...,...,...,###", "+": "...,.#.,###,.#.,...", "<": "..#,.#.,#..,.#.,..#",
    ">": "#..,.#.,..#,.#.,#..", " ": "...,...,...,...,...",
}
_SCALE = 2
COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
_INK = (30, 30, 30)


def text_width(text):
  return len(text) * 4 * _SCALE


def draw_text(canvas, text, x, y, colour=_INK):
  """Draws `text` (upper-cased; unknown characters as blanks) with its top-left corner at x, y."""
  for i, char in enumerate(text.upper()):
    rows = _GLYPHS.get(char, _GLYPHS[" "]).split(",")
    for r, row in enumerate(rows):
      for c, bit in enumerate(row):
        if bit == "#":
          top, left = y + r * _SCALE, x + (4 * i + c) * _SCALE
          canvas[max(0, top):max(0, top + _SCALE), max(0, left):max(0, left + _SCALE)] = colour


def _line(canvas, x0, y0, x1, y1, colour, width=2):
  steps = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
  for t in np.linspace(0.0, 1.0, steps):
    x, y = int(round(x0 + t * (x1 - x0))), int(round(y0 + t * (y1 - y0)))
    half, rest = width // 2, (width + 1) // 2
    canvas[max(0, y - half):y + rest, max(0, x - half):x + rest] = colour


def _ticks(low, high, count=5):
  """About `count` round tick values covering [low, high]."""
  span = (high - low) or abs(high) or 1.0
  raw = span / count
  step = 10 ** np.floor(np.log10(raw))
  for factor in (1, 2, 5, 10):
    if raw <= factor * step:
      step *= factor
      break
  start = np.floor(low / step) * step
  return [float(v) for v in np.arange(start, high + step * 1.001, step)]


def _label(value):
  text = f"{value:.6g}"
  if abs(value) >= 10000:
    text = f"{value / 1000:.0f}K" if value % 1000 == 0 else f"{value / 1000:.1f}K"
  return text


def line_chart(path, series, title, xlabel, ylabel, size=(720, 480), legend="upper left"):
  """Writes a PNG line chart.

  Args:
    path: the file to write.
    series: [(label, xs, ys)]; each is drawn as a line with square markers,
      in the order of `COLOURS`.
    title, xlabel, ylabel: texts (drawn upper-case).
    size: (width, height) in pixels.
    legend: "upper left" or "lower right" of the plot area.
  """
  if legend not in ("upper left", "lower right"):
    raise ValueError(f"legend must be 'upper left' or 'lower right'; got {legend!r}.")
  if not series or not any(len(xs) for _, xs, _ in series):
    raise ValueError(f"Nothing to plot in '{path}': the series are empty.")
  width, height = size
  canvas = np.full((height, width, 3), 255, np.uint8)
  left, right, top, bottom = 90, 20, 40, 70
  xs_all = np.concatenate([np.asarray(xs, float) for _, xs, _ in series])
  ys_all = np.concatenate([np.asarray(ys, float) for _, _, ys in series])
  xticks, yticks = _ticks(xs_all.min(), xs_all.max()), _ticks(ys_all.min(), ys_all.max())
  x0, x1, y0, y1 = xticks[0], xticks[-1], yticks[0], yticks[-1]
  plot_w, plot_h = width - left - right, height - top - bottom

  def px(x, y):
    return (left + (x - x0) / ((x1 - x0) or 1) * plot_w,
            top + plot_h - (y - y0) / ((y1 - y0) or 1) * plot_h)

  for value in xticks:
    x, _ = px(value, y0)
    _line(canvas, x, top, x, top + plot_h, (235, 235, 235), 1)
    label = _label(value)
    draw_text(canvas, label, int(x - text_width(label) / 2), top + plot_h + 8)
  for value in yticks:
    _, y = px(x0, value)
    _line(canvas, left, y, left + plot_w, y, (235, 235, 235), 1)
    label = _label(value)
    draw_text(canvas, label, left - 8 - text_width(label), int(y - 5))
  _line(canvas, left, top, left, top + plot_h, _INK)
  _line(canvas, left, top + plot_h, left + plot_w, top + plot_h, _INK)
  draw_text(canvas, title, (width - text_width(title)) // 2, 12)
  draw_text(canvas, xlabel, left + (plot_w - text_width(xlabel)) // 2, height - 30)
  draw_text(canvas, ylabel, 4, 16)
  for i, (label, xs, ys) in enumerate(series):
    colour = COLOURS[i % len(COLOURS)]
    points = sorted(zip(xs, ys))
    for (xa, ya), (xb, yb) in zip(points, points[1:]):
      _line(canvas, *px(xa, ya), *px(xb, yb), colour)
    for x, y in points:
      cx, cy = (int(round(v)) for v in px(x, y))
      canvas[max(0, cy - 3):cy + 4, max(0, cx - 3):cx + 4] = colour
    if legend == "upper left":
      lx, ly = left + 10, top + 8 + 16 * i
    else:
      longest = max(text_width(name) for name, _, _ in series)
      lx, ly = left + plot_w - longest - 30, top + plot_h - 8 - 16 * (len(series) - i)
    canvas[ly:ly + 10, lx:lx + 10] = colour
    draw_text(canvas, label, lx + 16, ly)
  write_png(path, canvas)


def write_png(path, image):
  """Writes an (height, width, 3) uint8 array as an RGB PNG."""
  image = np.ascontiguousarray(image, np.uint8)
  height, width, _ = image.shape
  raw = b"".join(b"\x00" + image[row].tobytes() for row in range(height))

  def chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data +
            struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

  with open(path, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0,
                                                                0, 0)) +
            chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def read_png(path):
  """Reads back a PNG written by `write_png` (8-bit RGB, no filtering): an (h, w, 3) array."""
  with open(path, "rb") as f:
    data = f.read()
  if data[:8] != b"\x89PNG\r\n\x1a\n":
    raise ValueError(f"'{path}' is not a PNG file.")
  pos, idat, width, height = 8, b"", 0, 0
  while pos < len(data):
    length, kind = struct.unpack(">I", data[pos:pos + 4])[0], data[pos + 4:pos + 8]
    body = data[pos + 8:pos + 8 + length]
    if kind == b"IHDR":
      width, height = struct.unpack(">II", body[:8])
    elif kind == b"IDAT":
      idat += body
    pos += 12 + length
  rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, 1 + 3 * width)
  return rows[:, 1:].reshape(height, width, 3)
