// The mask painter: the uploaded image on a canvas, a brush that paints the region to regenerate
// (shown in translucent red), and export as a black/white PNG at the image's own size.

const SHOW = "rgba(255, 40, 80, 0.55)";

export class MaskPainter {
  /**
   * @param {HTMLCanvasElement} canvas the visible canvas
   * @param {HTMLInputElement} brush range input with the brush diameter in screen pixels
   */
  constructor(canvas, brush) {
    this.canvas = canvas;
    this.brush = brush;
    this.image = null;               // HTMLImageElement of the input
    this.mask = document.createElement("canvas");  // image-sized, alpha = painted
    this.painting = false;
    this.last = null;
    this.painted = false;
    canvas.addEventListener("pointerdown", (e) => this.down(e));
    canvas.addEventListener("pointermove", (e) => this.move(e));
    for (const t of ["pointerup", "pointercancel", "pointerleave"]) canvas.addEventListener(t, () => this.up());
    canvas.addEventListener("keydown", (e) => {
      const k = e.key.toLowerCase();
      if (k === "a") this.fill(); else if (k === "c") this.clear(); else if (k === "i") this.invert(); else return;
      e.preventDefault();
    });
  }

  /** Show an image (an HTMLImageElement that has loaded) and start with an empty mask. */
  setImage(img) {
    this.image = img;
    this.mask.width = img.naturalWidth;
    this.mask.height = img.naturalHeight;
    this.canvas.width = img.naturalWidth;
    this.canvas.height = img.naturalHeight;
    this.canvas.style.aspectRatio = img.naturalWidth + " / " + img.naturalHeight;
    this.canvas.style.setProperty("--ar", String(img.naturalWidth / img.naturalHeight));
    this.clear();
  }

  hasImage() { return this.image !== null; }

  /** True when some pixel of the mask is painted. */
  isPainted() {
    if (!this.image) return false;
    const d = this.mask.getContext("2d").getImageData(0, 0, this.mask.width, this.mask.height).data;
    for (let i = 3; i < d.length; i += 4) if (d[i] > 0) return true;
    return false;
  }

  point(e) {
    const r = this.canvas.getBoundingClientRect();
    return { x: (e.clientX - r.left) * this.mask.width / r.width, y: (e.clientY - r.top) * this.mask.height / r.height };
  }

  radius() {
    // the slider is in screen pixels: convert to image pixels so the brush looks the same at any zoom
    const r = this.canvas.getBoundingClientRect();
    const scale = r.width ? this.mask.width / r.width : 1;
    return Math.max(1, Number(this.brush.value) * scale / 2);
  }

  down(e) {
    if (!this.image || e.button > 0) return;
    this.painting = true;
    this.canvas.setPointerCapture(e.pointerId);
    this.last = this.point(e);
    this.stroke(this.last, this.last);
    e.preventDefault();
  }

  move(e) {
    if (!this.painting) return;
    const p = this.point(e);
    this.stroke(this.last, p);
    this.last = p;
  }

  up() { this.painting = false; this.last = null; }

  stroke(a, b) {
    const ctx = this.mask.getContext("2d");
    ctx.strokeStyle = "#fff";
    ctx.fillStyle = "#fff";
    ctx.lineCap = "round";
    ctx.lineWidth = this.radius() * 2;
    ctx.beginPath();
    ctx.moveTo(a.x, a.y);
    ctx.lineTo(b.x + 0.01, b.y);
    ctx.stroke();
    this.draw();
  }

  fill() {
    if (!this.image) return;
    const ctx = this.mask.getContext("2d");
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, this.mask.width, this.mask.height);
    this.draw();
  }

  clear() {
    this.mask.getContext("2d").clearRect(0, 0, this.mask.width, this.mask.height);
    this.draw();
  }

  invert() {
    if (!this.image) return;
    const ctx = this.mask.getContext("2d");
    const img = ctx.getImageData(0, 0, this.mask.width, this.mask.height);
    for (let i = 0; i < img.data.length; i += 4) {
      const on = img.data[i + 3] > 127;
      img.data[i] = img.data[i + 1] = img.data[i + 2] = 255;
      img.data[i + 3] = on ? 0 : 255;
    }
    ctx.putImageData(img, 0, 0);
    this.draw();
  }

  /** Redraw the visible canvas: the image, then the painted region in translucent red. */
  draw() {
    const ctx = this.canvas.getContext("2d");
    ctx.clearRect(0, 0, this.canvas.width, this.canvas.height);
    if (!this.image) return;
    ctx.drawImage(this.image, 0, 0);
    const tint = document.createElement("canvas");
    tint.width = this.mask.width;
    tint.height = this.mask.height;
    const t = tint.getContext("2d");
    t.drawImage(this.mask, 0, 0);
    t.globalCompositeOperation = "source-in";
    t.fillStyle = SHOW;
    t.fillRect(0, 0, tint.width, tint.height);
    ctx.drawImage(tint, 0, 0);
  }

  /** The mask as a PNG data URL at the image's size: white = regenerate, black = keep. */
  toDataURL() {
    const out = document.createElement("canvas");
    out.width = this.mask.width;
    out.height = this.mask.height;
    const ctx = out.getContext("2d");
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, out.width, out.height);
    ctx.drawImage(this.mask, 0, 0);
    return out.toDataURL("image/png");
  }
}
