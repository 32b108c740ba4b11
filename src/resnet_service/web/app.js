// The upload page: stage images (picker, drop, paste), send them to /classify/batch in one
// request (split only above the server's max_batch_files), show a card per image. With the
// "Show heatmap" toggle on, a card asks /explain for its image and lays the class activation
// map over the preview, exactly over the crop the model saw; a bar picks the class to map.
// Server strings (filenames, labels, error details) only ever go through textContent.
"use strict";

(() => {
  const TOP_K_CHOICES = [1, 3, 5, 10];

  const $ = (id) => document.getElementById(id);
  const ui = {
    form: $("classify-form"),
    input: $("file-input"),
    dropzone: $("dropzone"),
    topK: $("top-k"),
    model: $("model"),
    modelField: $("model-field"),
    tokenField: $("token-field"),
    token: $("token"),
    classify: $("classify"),
    clear: $("clear"),
    status: $("status"),
    results: $("results"),
    banner: $("dev-banner"),
    modelName: $("model-name"),
    modelPrecision: $("model-precision"),
    modelRuntime: $("model-runtime"),
    modelWeights: $("model-weights"),
    modelSha: $("model-sha"),
  };

  // Defaults match the server's; /model replaces them once it answers.
  const limits = {
    maxBatchFiles: 64,
    maxBatchBytes: 64 * 1024 * 1024,
    maxUploadBytes: 20 * 1024 * 1024,
    maxTopK: 1000,
  };
  // Framing per image in a multipart body (boundary and part headers), generously.
  const PART_OVERHEAD = 1024;

  // Split into requests the server accepts: at most maxBatchFiles images and maxBatchBytes.
  function chunksOf(todo) {
    const chunks = [];
    let current = [];
    let bytes = 0;
    for (const item of todo) {
      const size = item.file.size + PART_OVERHEAD;
      if (current.length && (current.length >= limits.maxBatchFiles || bytes + size > limits.maxBatchBytes)) {
        chunks.push(current);
        current = [];
        bytes = 0;
      }
      current.push(item);
      bytes += size;
    }
    if (current.length) chunks.push(current);
    return chunks;
  }
  const items = []; // {id, file, name, url, card, body, state, k, retriable, model, heat...}
  // Which models /explain can map (by the picker's value, "" for the server's default).
  const explainable = new Map();
  let nextId = 1;
  let busy = false;
  let userPickedTopK = false;

  // ---- small helpers -------------------------------------------------------------------

  function h(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (name === "text") node.textContent = value;
      else if (name === "class") node.className = value;
      else node.setAttribute(name, value);
    }
    node.append(...children);
    return node;
  }

  /** "83.1%": one decimal, and "<0.1%" for what would round to nothing. */
  function formatPercent(score) {
    if (score > 0 && score < 0.0005) return "<0.1%";
    return `${(score * 100).toFixed(1)}%`;
  }

  function formatBytes(n) {
    if (n >= 1024 * 1024) return `${(n / (1024 * 1024)).toFixed(1)} MB`;
    if (n >= 1024) return `${Math.round(n / 1024)} KB`;
    return `${n} bytes`;
  }

  function plural(n, word) {
    return `${n} ${word}${n === 1 ? "" : "s"}`;
  }

  function setStatus(text, kind = "info") {
    ui.status.textContent = text;
    ui.status.dataset.kind = kind;
  }

  /** The problem+json detail, or a sentence about the status when the body is not one. */
  async function problemDetail(response) {
    try {
      const body = await response.json();
      if (body && typeof body.detail === "string") return body.detail;
    } catch {
      // not JSON: fall through
    }
    return `The service answered ${response.status} ${response.statusText}.`.trim();
  }

  function authHeaders() {
    const token = ui.token.value.trim();
    return token ? { Authorization: `Bearer ${token}` } : {};
  }

  const selectedTopK = () => Number(ui.topK.value);
  // Unreadable files are not sent again; only server-side trouble (5xx) is worth a retry.
  function needsWork(item) {
    if (item.state === "pending") return true;
    if (item.state === "done") return item.k !== selectedTopK();
    return item.state === "error" && item.retriable;
  }

  function updateButtons() {
    const nothingToDo = busy || !items.some(needsWork);
    // aria-disabled rather than disabled: the buttons stay focusable for keyboard users.
    ui.classify.setAttribute("aria-disabled", String(nothingToDo));
    ui.clear.setAttribute("aria-disabled", String(busy || items.length === 0));
    ui.form.setAttribute("aria-busy", String(busy));
  }

  // ---- cards ---------------------------------------------------------------------------

  function setCardBody(item, state, ...children) {
    if (item.heat.on || item.heat.shown) hideHeat(item); // the bars it belonged to are gone
    item.state = state;
    item.card.dataset.state = state;
    item.card.setAttribute("aria-busy", String(state === "busy"));
    item.body.replaceChildren(...children);
  }

  function showNote(item, state, text) {
    setCardBody(item, state, h("p", { class: "note", "data-testid": "card-note", text }));
  }

  function showError(item, detail, state = "error") {
    setCardBody(
      item,
      state,
      h(
        "p",
        { class: "error", "data-testid": "card-error" },
        h("span", { class: "error-icon", "aria-hidden": "true", text: "!" }),
        h("span", { "data-testid": "card-error-detail", text: detail }),
      ),
    );
  }

  const canExplain = (item) => explainable.get(item.model) !== false && !item.previewBroken;

  // The model's tags (its rules' words for what it sees) as chips, best first.
  function tagChips(tags) {
    if (!tags || tags.length === 0) return null;
    const list = h("ul", { class: "tags", role: "list", "aria-label": "Tags", "data-testid": "tags" });
    for (const t of tags) {
      const also = t.categories.length ? ` · ${t.categories.join(", ")}` : "";
      list.append(
        h("li", {
          class: "chip",
          "data-testid": "tag",
          title: `${formatPercent(t.score)}${also}`,
          text: t.name,
        }),
      );
    }
    return list;
  }

  function showPredictions(item, predictions, k, tags) {
    const mappable = canExplain(item);
    const list = h("ol", {
      class: "bars",
      role: "list",
      "aria-label": `Top ${predictions.length} predictions`,
      "data-testid": "predictions",
    });
    item.barButtons = [];
    for (const p of predictions) {
      const fill = h("span", { class: "fill" });
      fill.style.width = `${Math.min(100, Math.max(0, p.score * 100))}%`;
      const content = [
        h(
          "span",
          { class: "bar-text" },
          h("span", { class: "bar-label", "data-testid": "prediction-label", text: p.label }),
          h("span", { class: "bar-pct", "data-testid": "prediction-score", text: formatPercent(p.score) }),
        ),
        h("span", { class: "bar", "aria-hidden": "true" }, fill),
      ];
      let row = content;
      if (mappable) {
        // A toggle button per class: pressed while the heatmap shows that class.
        const button = h(
          "button",
          {
            type: "button",
            class: "bar-button",
            "aria-pressed": "false",
            title: "Show where the model sees this class",
            "data-index": String(p.index),
            "data-testid": "prediction-button",
          },
          ...content,
        );
        button.addEventListener("click", () => pickClass(item, p.index));
        item.barButtons.push(button);
        row = [button];
      }
      list.append(h("li", { class: "bar-row", "data-testid": "prediction" }, ...row));
    }
    item.k = k;
    item.predictions = predictions;
    item.tags = tags || [];
    const chips = tagChips(item.tags);
    const children = chips ? [chips, list] : [list];
    item.heatToggle = null;
    if (mappable) {
      const toggle = h("input", { type: "checkbox", class: "heat-check", "data-testid": "heatmap-toggle" });
      toggle.addEventListener("change", () => (toggle.checked ? showHeat(item) : hideHeat(item)));
      item.heatToggle = toggle;
      children.push(
        h(
          "div",
          { class: "heat-row" },
          h("label", { class: "heat-toggle" }, toggle, h("span", { text: "Show heatmap" })),
          h("span", { class: "heat-hint", "data-testid": "heatmap-hint", hidden: "", text: "Pick a bar to map that class." }),
        ),
      );
    }
    setCardBody(item, "done", ...children);
  }

  // ---- class activation maps -----------------------------------------------------------

  // Overlays follow their preview when the layout changes (window resize, grid reflow).
  const previewsResized = new ResizeObserver((entries) => {
    for (const entry of entries) {
      const item = items.find((i) => i.preview === entry.target);
      if (item) placeHeat(item);
    }
  });

  /** Where the photo's pixels are drawn, in CSS pixels relative to the preview frame (the
   *  <img> box fits the frame; object-fit decides how the picture sits inside it). */
  function pictureBox(item) {
    const img = item.img;
    const frame = item.preview.getBoundingClientRect();
    const box = img.getBoundingClientRect();
    const nw = img.naturalWidth;
    const nh = img.naturalHeight;
    let width = box.width;
    let height = box.height;
    const fit = getComputedStyle(img).objectFit;
    if (fit === "contain" || fit === "cover" || fit === "scale-down") {
      let scale = (fit === "cover" ? Math.max : Math.min)(box.width / nw, box.height / nh);
      if (fit === "scale-down") scale = Math.min(scale, 1);
      width = nw * scale;
      height = nh * scale;
    } else if (fit === "none") {
      width = nw;
      height = nh;
    }
    // object-position is the default, centred.
    return {
      left: box.left - frame.left - item.preview.clientLeft + (box.width - width) / 2,
      top: box.top - frame.top - item.preview.clientTop + (box.height - height) / 2,
      width,
      height,
    };
  }

  /** The heatmap over crop_box: image pixels (the upright image the server decoded) scaled to
   *  the displayed picture. */
  function placeHeat(item) {
    const shown = item.heat.shown;
    if (!shown || !item.img.naturalWidth) return;
    const cam = shown.cam;
    const picture = pictureBox(item);
    const sx = picture.width / cam.image_width;
    const sy = picture.height / cam.image_height;
    const crop = cam.crop_box;
    const style = item.overlay.style;
    style.left = `${picture.left + crop.left * sx}px`;
    style.top = `${picture.top + crop.top * sy}px`;
    style.width = `${(crop.right - crop.left) * sx}px`;
    style.height = `${(crop.bottom - crop.top) * sy}px`;
  }

  function setHeatCaption(item, text, kind = "info") {
    item.caption.textContent = text;
    item.caption.dataset.kind = kind;
  }

  function markPressed(item, index) {
    for (const button of item.barButtons || []) {
      button.setAttribute("aria-pressed", String(index !== null && Number(button.dataset.index) === index));
    }
  }

  function drawHeat(item, body) {
    const { overlay } = item;
    item.heat.shown = body;
    overlay.src = `data:image/png;base64,${body.cam.heatmap_png}`;
    overlay.alt = `Heatmap of where the model sees ${body.target.label}`;
    overlay.dataset.target = String(body.target.index);
    overlay.dataset.label = body.target.label;
    item.preview.classList.add("is-explaining");
    if (!overlay.isConnected && !item.previewBroken) item.img.after(overlay);
    placeHeat(item);
    overlay.hidden = false;
    previewsResized.observe(item.preview);
    markPressed(item, body.target.index);
    setHeatCaption(item, `Heatmap: ${body.target.label} (${formatPercent(body.target.score)})`);
  }

  function clearHeat(item) {
    const heat = item.heat;
    heat.seq += 1; // an answer still on its way is no longer wanted
    if (heat.abort) heat.abort.abort();
    heat.abort = null;
    heat.shown = null;
    if (item.overlay) {
      item.overlay.hidden = true;
      item.overlay.remove();
      item.overlay.removeAttribute("src");
      delete item.overlay.dataset.target;
      delete item.overlay.dataset.label;
      item.preview.classList.remove("is-explaining");
      setHeatCaption(item, "");
      previewsResized.unobserve(item.preview);
    }
    markPressed(item, null);
  }

  function hideHeat(item) {
    item.heat.on = false;
    if (item.heatToggle) item.heatToggle.checked = false;
    const hint = item.body.querySelector(".heat-hint");
    if (hint) hint.hidden = true;
    clearHeat(item);
  }

  /** Clicking a bar maps its class (turning the heatmap on); clicking the pressed one again
   *  turns the heatmap off, as a toggle button does. */
  function pickClass(item, index) {
    const pressed = item.barButtons.some((b) => b.getAttribute("aria-pressed") === "true" && Number(b.dataset.index) === index);
    if (item.heat.on && pressed) {
      hideHeat(item);
      return;
    }
    item.heat.target = index;
    showHeat(item);
  }

  async function showHeat(item) {
    if (!canExplain(item) || !item.predictions) return;
    const heat = item.heat;
    heat.on = true;
    if (item.heatToggle) item.heatToggle.checked = true;
    const hint = item.body.querySelector(".heat-hint");
    if (hint) hint.hidden = false;
    // No bar picked yet: the top class (target=top1), which is the first bar.
    const target = heat.target === null ? "top1" : String(heat.target);
    const key = `${item.model}|${target}`;
    const wanted = heat.target === null ? item.predictions[0].index : heat.target;
    const known = item.maps.get(key);
    if (heat.abort) heat.abort.abort();
    const seq = ++heat.seq;
    if (known) {
      drawHeat(item, known);
      return;
    }
    markPressed(item, wanted);
    const label = (item.predictions.find((p) => p.index === wanted) || {}).label || `class ${wanted}`;
    setHeatCaption(item, `Mapping ${label}…`, "busy");
    const controller = new AbortController();
    heat.abort = controller;
    const params = new URLSearchParams({ target, top_k: String(item.k) });
    if (item.model) params.set("model", item.model);
    const form = new FormData();
    form.append("image", item.file, item.name);
    let body = null;
    let problem = null;
    try {
      const response = await fetch(`/explain?${params}`, {
        method: "POST",
        body: form,
        headers: authHeaders(),
        signal: controller.signal,
      });
      if (response.ok) body = await response.json();
      else {
        if (response.status === 401) showTokenField();
        problem = await problemDetail(response);
      }
    } catch (error) {
      if (error && error.name === "AbortError") return;
      problem = "Could not reach the service. Check that it is running and try again.";
    }
    if (seq !== heat.seq || !heat.on) return; // superseded, switched off or removed meanwhile
    heat.abort = null;
    if (problem !== null) {
      if (item.overlay) item.overlay.hidden = true;
      heat.shown = null;
      setHeatCaption(item, problem, "error");
      return;
    }
    item.maps.set(key, body);
    item.maps.set(`${item.model}|${body.target.index}`, body);
    drawHeat(item, body);
  }

  function makeCard(item) {
    const img = h("img", { class: "photo", alt: `Preview of ${item.name}`, src: item.url, decoding: "async" });
    // Drawn over the crop the model saw (in the preview only while shown); the caption names
    // the class it maps.
    item.overlay = h("img", { class: "heatmap", alt: "", "data-testid": "heatmap", hidden: "" });
    item.caption = h("p", { class: "heat-caption", "data-testid": "heatmap-label", "aria-live": "polite" });
    item.img = img;
    const preview = h("div", { class: "preview" }, img, item.caption);
    item.preview = preview;
    img.addEventListener("load", () => placeHeat(item));
    img.addEventListener(
      "error",
      () => {
        item.previewBroken = true; // nothing to draw a heatmap over
        hideHeat(item);
        if (item.heatToggle) item.heatToggle.closest(".heat-row").hidden = true;
        preview.replaceChildren(h("span", { class: "no-preview", text: "No preview" }));
      },
      { once: true },
    );
    const remove = h("button", {
      type: "button",
      class: "remove",
      "aria-label": `Remove ${item.name}`,
      "data-testid": "card-remove",
      text: "×",
    });
    remove.addEventListener("click", () => removeItem(item));
    item.body = h("div", { class: "card-result", "data-testid": "card-result" });
    item.card = h(
      "li",
      { class: "card", "data-testid": "card" },
      preview,
      h(
        "div",
        { class: "card-body" },
        h("div", { class: "card-head" }, h("p", { class: "filename", "data-testid": "card-filename", text: item.name }), remove),
        item.body,
      ),
    );
  }

  function addFiles(fileList) {
    const files = Array.from(fileList || []);
    if (!files.length) return;
    for (const file of files) {
      const id = nextId++;
      const name = file.name || `pasted-image-${id}`;
      const item = {
        id,
        file,
        name,
        url: URL.createObjectURL(file),
        k: null,
        model: "",
        maps: new Map(), // "model|target" -> the /explain answer
        heat: { on: false, target: null, shown: null, seq: 0, abort: null },
      };
      makeCard(item);
      if (file.size > limits.maxUploadBytes) {
        showError(
          item,
          `This file is ${formatBytes(file.size)}; the service accepts images up to ${formatBytes(limits.maxUploadBytes)}.`,
          "rejected",
        );
      } else {
        showNote(item, "pending", "Ready to classify");
      }
      items.push(item);
      ui.results.append(item.card);
    }
    setStatus(`Added ${plural(files.length, "image")}. Press Classify to see the Top-${selectedTopK()}.`);
    updateButtons();
  }

  function forget(item) {
    hideHeat(item);
    URL.revokeObjectURL(item.url);
    item.card.remove();
    items.splice(items.indexOf(item), 1);
  }

  function removeItem(item) {
    if (busy) return;
    const next = items[items.indexOf(item) + 1] || items[items.indexOf(item) - 1];
    forget(item);
    setStatus(`Removed ${item.name}.`);
    // Keep keyboard users where they were instead of dropping focus to <body>.
    (next ? next.card.querySelector(".remove") : ui.input).focus();
    updateButtons();
  }

  function clearAll() {
    if (busy || !items.length) return;
    for (const item of [...items]) forget(item);
    setStatus("Cleared.");
    updateButtons();
  }

  // ---- classification ------------------------------------------------------------------

  async function sendChunk(chunk, k) {
    const form = new FormData();
    for (const item of chunk) form.append("images", item.file, item.name);
    const model = ui.model.value; // the picker may change while this request is out
    let response;
    try {
      response = await fetch(`/classify/batch?top_k=${k}${model ? `&model=${encodeURIComponent(model)}` : ""}`, {
        method: "POST",
        body: form,
        headers: authHeaders(),
      });
    } catch {
      return { error: "Could not reach the service. Check that it is running and try again." };
    }
    if (!response.ok) {
      if (response.status === 401) showTokenField();
      return { error: await problemDetail(response) };
    }
    const body = await response.json();
    showModelRef(body.model);
    for (const result of body.results) {
      const item = chunk[result.index];
      if (!item) continue;
      item.model = model; // its heatmaps come from the model that classified it
      if (result.error) {
        item.retriable = result.error.status >= 500;
        showError(item, result.error.detail);
      }
      else showPredictions(item, result.predictions, k, result.tags);
    }
    return { succeeded: body.succeeded, failed: body.failed };
  }

  async function classify() {
    if (busy) return;
    const k = selectedTopK();
    const todo = items.filter(needsWork);
    if (!todo.length) {
      setStatus(items.length ? `Every image already shows its Top-${k}.` : "Choose, drop or paste some images first.");
      return;
    }
    busy = true;
    updateButtons();
    for (const item of todo) showNote(item, "busy", "Classifying…");
    setStatus(`Classifying ${plural(todo.length, "image")}…`);
    let succeeded = 0;
    let failed = 0;
    let requestError = null;
    for (const chunk of chunksOf(todo)) {
      if (requestError) break;
      const outcome = await sendChunk(chunk, k);
      if (outcome.error) requestError = outcome.error;
      else {
        succeeded += outcome.succeeded;
        failed += outcome.failed;
      }
    }
    for (const item of todo) {
      if (item.state === "busy") showNote(item, "pending", "Not classified yet");
    }
    busy = false;
    updateButtons();
    if (requestError) {
      setStatus(requestError, "error");
    } else if (failed) {
      setStatus(`Classified ${succeeded} of ${plural(todo.length, "image")}; ${failed} could not be read.`, "warning");
    } else {
      setStatus(`Classified ${plural(succeeded, "image")}.`, "success");
    }
  }

  // ---- model info ----------------------------------------------------------------------

  function showTokenField() {
    if (ui.tokenField.hidden) {
      ui.tokenField.hidden = false;
      ui.token.focus();
    }
  }

  function showModelRef(model) {
    if (!model) return;
    ui.modelName.textContent = model.name;
    ui.modelPrecision.textContent = model.precision;
    if (model.runtime) ui.modelRuntime.textContent = model.runtime;
    ui.banner.hidden = !model.random_weights;
  }

  function fillTopK(defaultK, maxK) {
    const current = selectedTopK();
    const choices = [...new Set([...TOP_K_CHOICES, defaultK])].filter((k) => k <= maxK).sort((a, b) => a - b);
    ui.topK.replaceChildren(...choices.map((k) => h("option", { value: String(k), text: String(k) })));
    const wanted = userPickedTopK && choices.includes(current) ? current : defaultK;
    ui.topK.value = String(choices.includes(wanted) ? wanted : choices[choices.length - 1]);
  }

  // The picked model of a repository (none picked: the server's default).
  function modelQuery(lead) {
    return ui.model.value ? `${lead}model=${encodeURIComponent(ui.model.value)}` : "";
  }

  // A repository with several models: offer them (GET /models); one model: no picker.
  async function loadModels() {
    let listing;
    try {
      const response = await fetch("/models", { headers: { Accept: "application/json" } });
      if (!response.ok) return;
      listing = await response.json();
    } catch {
      return;
    }
    const names = listing.models.map((m) => m.name);
    if (names.length < 2) return;
    ui.model.replaceChildren(...names.map((name) => h("option", { value: name, text: name })));
    ui.model.value = listing.default || names[0];
    ui.modelField.hidden = false;
  }

  async function loadModel(attempt = 0) {
    let response;
    try {
      response = await fetch(`/model${modelQuery("?")}`, { headers: { Accept: "application/json" } });
    } catch {
      response = null;
    }
    if (!response || !response.ok) {
      // 503 while the model loads and warms up: say so and look again.
      const detail = response ? await problemDetail(response) : "The service does not answer.";
      setStatus(`${detail} Retrying…`, "warning");
      const retryAfter = Number(response && response.headers.get("Retry-After")) || 1;
      setTimeout(() => loadModel(attempt + 1), Math.min(retryAfter, 5) * 1000);
      return;
    }
    const info = await response.json();
    const settings = info.settings || {};
    const mappable = info.explainable !== false;
    if (explainable.get(ui.model.value) !== mappable) {
      explainable.set(ui.model.value, mappable);
      // Cards of this model already showing bars: offer (or withdraw) the heatmap.
      for (const item of items) {
        if (item.state === "done" && item.model === ui.model.value) showPredictions(item, item.predictions, item.k, item.tags);
      }
    }
    limits.maxBatchFiles = Number(settings.max_batch_files) || limits.maxBatchFiles;
    limits.maxUploadBytes = Number(settings.max_upload_bytes) || limits.maxUploadBytes;
    limits.maxBatchBytes = Number(settings.max_batch_bytes) || limits.maxBatchBytes;
    limits.maxTopK = Number(settings.max_top_k) || limits.maxTopK;
    fillTopK(Number(settings.default_top_k) || 5, limits.maxTopK);
    if (settings.auth_required) ui.tokenField.hidden = false;
    showModelRef(info);
    ui.modelWeights.textContent = info.weights_source;
    ui.modelSha.textContent = (info.weights_sha256 || "").slice(0, 12);
    ui.modelSha.title = info.weights_sha256 || "";
    if (attempt > 0 || ui.status.dataset.kind === "warning") setStatus("The model is ready.");
    ui.form.dataset.ready = "true";
    updateButtons();
  }

  // ---- events --------------------------------------------------------------------------

  ui.input.addEventListener("change", () => {
    addFiles(ui.input.files);
    ui.input.value = ""; // choosing the same file again still fires "change"
  });

  ui.form.addEventListener("submit", (event) => {
    event.preventDefault();
    classify();
  });
  ui.clear.addEventListener("click", clearAll);
  ui.topK.addEventListener("change", () => {
    userPickedTopK = true;
    updateButtons();
  });

  // Drop anywhere on the page; the drop zone lights up while files are dragged over it.
  const hasFiles = (event) => Array.from(event.dataTransfer?.types || []).includes("Files");
  let dragDepth = 0;
  document.addEventListener("dragenter", (event) => {
    if (!hasFiles(event)) return;
    dragDepth += 1;
    ui.dropzone.classList.add("is-dragover");
  });
  document.addEventListener("dragleave", (event) => {
    if (!hasFiles(event)) return;
    dragDepth = Math.max(0, dragDepth - 1);
    if (dragDepth === 0) ui.dropzone.classList.remove("is-dragover");
  });
  document.addEventListener("dragover", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault(); // otherwise the browser opens the file instead
    event.dataTransfer.dropEffect = "copy";
  });
  document.addEventListener("drop", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    dragDepth = 0;
    ui.dropzone.classList.remove("is-dragover");
    addFiles(event.dataTransfer.files);
  });

  // Paste: only clipboard files; pasted text (e.g. into the token field) is left alone.
  document.addEventListener("paste", (event) => {
    const files = Array.from(event.clipboardData?.files || []);
    if (!files.length) return;
    event.preventDefault();
    addFiles(files);
  });

  updateButtons();
  ui.model.addEventListener("change", () => loadModel());
  loadModels().then(() => loadModel());
})();
