// The job form's uploads: the input image (also drawn on the mask canvas) and the image prompts (IP-Adapter
// reference images), each sent to POST /api/v1/uploads as soon as it is chosen.

import { api, ApiError } from "./api.js";

const $ = (id) => document.getElementById(id);

export class Uploads {
  /** `painter`: the mask canvas the input image is shown on; `form`: {clearErrors(), showError(err)}. */
  constructor(painter, form) {
    this.painter = painter;
    this.form = form;
    this.imageId = null;  // the input image's upload
    this.imagePromptIds = [];  // the uploads of the chosen reference images
    this.maxImagePrompts = 4;  // the server's `max_items` of image_prompts
    $("image").addEventListener("change", () => this.upload());
    $("image_prompts").addEventListener("change", () => this.uploadImagePrompts());
  }

  failed(err, field) {
    this.form.showError(err instanceof ApiError ? Object.assign(err, { field: err.field || field }) : err);
  }

  async upload() {
    this.form.clearErrors();
    this.imageId = null;
    const file = $("image").files[0];
    if (!file) return;
    const url = URL.createObjectURL(file);
    const img = new Image();
    img.alt = "";
    await new Promise((ok, fail) => { img.onload = ok; img.onerror = fail; img.src = url; })
      .catch(() => this.form.showError({ field: "images", message: "this file is not an image the browser can read" }));
    if (img.naturalWidth) this.painter.setImage(img);
    const fd = new FormData();
    fd.append("file", file, file.name);
    try {
      const { upload } = await api("POST", "uploads", fd);
      this.imageId = upload.id;
      $("image").dataset.uploadId = upload.id;
    } catch (err) {
      this.failed(err, "images");
    }
  }

  /** Upload the chosen reference images (image prompts), at most the server's `max_items` of them. */
  async uploadImagePrompts() {
    this.form.clearErrors();
    this.imagePromptIds = [];
    delete $("image_prompts").dataset.uploadIds;
    const files = [...$("image_prompts").files];
    if (files.length > this.maxImagePrompts) {
      this.form.showError({ field: "image_prompts", message: `choose at most ${this.maxImagePrompts} reference images` });
      return;
    }
    try {
      for (const file of files) {
        const fd = new FormData();
        fd.append("file", file, file.name);
        this.imagePromptIds.push((await api("POST", "uploads", fd)).upload.id);
      }
      $("image_prompts").dataset.uploadIds = this.imagePromptIds.join(",");
    } catch (err) {
      this.imagePromptIds = [];
      this.failed(err, "image_prompts");
    }
  }
}
