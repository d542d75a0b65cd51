// tileup's page: vanilla JS, same-origin requests only. The server plans every box drawn here.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  models: null, fields: {}, files: [], imageSize: null, plan: null, jobs: new Map(),
  selected: null, planTimer: null, reuse: null, reuseGenerate: null, sourceUrl: null,
  mode: "upscale", genTimer: null,
};

function showMessage(text) {
  const box = $("message");
  box.textContent = text || "";
  box.hidden = !text;
}

async function api(path, options = {}) {
  const response = await fetch(path, options);
  const kind = response.headers.get("Content-Type") || "";
  const body = kind.startsWith("application/json") ? await response.json() : null;
  if (!response.ok) {
    throw new Error((body && body.error) || `${response.status} ${response.statusText}`);
  }
  return body;
}

// -- the settings form, built from the server's field list -------------------------------------

const GROUP_TITLES = {
  "pixel upscale": "Upscale", "re-diffusion": "Re-diffusion", "tiles": "Tiles",
  "redraw and seam fix": "Redraw / seam fix", "colour": "Colour fix",
  "device and memory": "Memory",
};

function optionsFor(field) {
  const m = state.models;
  if (field.name === "upscaler") return [...m.upscalers, ...m.resamplers, ...m.latent];
  if (field.name === "checkpoint") return ["", ...m.checkpoints];
  if (field.name === "vae") return ["", ...m.vaes];
  if (field.name === "sampler") return m.samplers;
  if (field.name === "scheduler") return m.schedulers;
  return field.choices;
}

function makeInput(field) {
  const choices = optionsFor(field);
  let input;
  if (choices) {
    input = document.createElement("select");
    for (const value of choices) {
      const option = document.createElement("option");
      option.value = value;
      option.textContent = value === "" ? "(none)" : value;
      input.append(option);
    }
  } else if (field.type === "bool") {
    input = document.createElement("input");
    input.type = "checkbox";
  } else if (field.name === "prompt" || field.name === "negative_prompt") {
    input = document.createElement("textarea");
  } else if (/^(int|float)/.test(field.type)) {
    input = document.createElement("input");
    input.type = "number";
    const b = field.bounds || {};
    input.step = b.multiple > 1 ? b.multiple : (b.integer || field.type.startsWith("int") ? 1 : "any");
    if (b.low !== null && b.low !== undefined) input.min = b.low;
    if (typeof b.high === "number") input.max = b.high;
    if (field.default === null) input.placeholder = "auto";
  } else {
    input = document.createElement("input");
    input.type = "text";
  }
  input.name = field.name;
  input.id = "f-" + field.name;
  input.title = field.help;
  return input;
}

function setValue(name, value) {
  const input = $("f-" + name);
  if (!input) return;
  if (input.type === "checkbox") input.checked = Boolean(value);
  else input.value = value === null || value === undefined ? "" : String(value);
}

function buildForm() {
  const form = $("settings");
  form.textContent = "";
  for (const [group, names] of Object.entries(state.models.groups)) {
    const set = document.createElement("fieldset");
    const legend = document.createElement("legend");
    legend.textContent = GROUP_TITLES[group] || group;
    set.append(legend);
    for (const name of names) {
      const field = state.fields[name];
      if (!field) continue;
      const row = document.createElement("div");
      row.className = "field";
      row.dataset.name = name;
      const label = document.createElement("label");
      label.htmlFor = "f-" + name;
      label.textContent = name.replace(/_/g, " ");
      label.title = field.help;
      row.append(label, makeInput(field));
      set.append(row);
    }
    form.append(set);
  }
  resetForm();
  form.addEventListener("input", schedulePlan);
  form.addEventListener("change", schedulePlan);
}

function resetForm() {
  for (const field of Object.values(state.fields)) setValue(field.name, field.default);
  setValue("checkpoint", state.models.default_checkpoint || "");
}

function readSettings() {
  const settings = {};
  for (const field of Object.values(state.fields)) {
    const input = $("f-" + field.name);
    if (!input) continue;
    let value;
    if (input.type === "checkbox") value = input.checked;
    else if (input.type === "number") value = input.value === "" ? null : Number(input.value);
    else value = input.value;
    if (field.name === "checkpoint" || field.name === "vae") {
      settings[field.name] = value || null;
      continue;
    }
    if (JSON.stringify(value) !== JSON.stringify(field.default)) settings[field.name] = value;
  }
  return settings;
}

function applySettings(values) {
  for (const [name, value] of Object.entries(values)) {
    if (name === "checkpoint" && value === null) setValue(name, "");
    else setValue(name, value);
  }
  schedulePlan();
}

// -- input files ------------------------------------------------------------------------------

function setFiles(list) {
  const files = [...list].filter((f) => f.type.startsWith("image/") || /\.(png|jpe?g|webp|tiff?|bmp)$/i.test(f.name));
  state.files = files;
  $("file-list").textContent = files.length > 1 ? `${files.length} images: ${files.map((f) => f.name).join(", ")}` : "";
  $("run").disabled = files.length === 0;
  if (!files.length) return;
  if (state.sourceUrl) URL.revokeObjectURL(state.sourceUrl);
  state.sourceUrl = URL.createObjectURL(files[0]);
  const img = $("image");
  img.onload = () => {
    state.imageSize = [img.naturalWidth, img.naturalHeight];
    schedulePlan();
  };
  img.onerror = () => {
    state.imageSize = null;
    showMessage(`${files[0].name}: the browser cannot show this image; the server will still check it`);
  };
  img.src = state.sourceUrl;
  checkParameters(files[0]);
}

async function checkParameters(file) {
  $("reuse").hidden = true;
  if (!/png|jpe?g|webp/i.test(file.type || file.name)) return;
  const form = new FormData();
  form.append("image", file, file.name);
  try {
    const answer = await api("/api/parameters", { method: "POST", body: form });
    if (answer.text) {
      state.reuse = answer.settings;
      state.reuseGenerate = answer.generate;
      $("reuse-text").textContent = answer.text;
      $("reuse").hidden = false;
    }
  } catch (error) {
    // not an image the server reads: the upload itself will say so
  }
}

// -- the plan: the server's boxes drawn over the image ----------------------------------------

function schedulePlan() {
  clearTimeout(state.planTimer);
  state.planTimer = setTimeout(requestPlan, 200);
}

async function requestPlan() {
  if (!state.imageSize) return;
  const [width, height] = state.imageSize;
  try {
    const plan = await api("/api/plan", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ width, height, settings: readSettings() }),
    });
    state.plan = plan;
    showMessage("");
    showPlan(plan);
  } catch (error) {
    state.plan = null;
    showMessage(error.message);
    drawOverlay();
  }
}

function bytes(gib) { return `${gib} GiB`; }

function showPlan(plan) {
  const parts = [
    `output <b>${plan.output[0]}×${plan.output[1]}</b>`,
    plan.mode ? `<b>${plan.tiles.length}</b> ${plan.mode} tiles` : `<b>${plan.pixel_tile_count}</b> pixel-model tiles`,
  ];
  if (plan.mode) parts.push(`<b>${plan.tile_steps}</b> tile-steps (${plan.steps_per_tile} steps each)`);
  if (plan.seam_fix_jobs) parts.push(`seam fix: <b>${plan.seam_fix_jobs}</b> regions, ${plan.seam_fix_tile_steps} tile-steps`);
  if (plan.memory && !plan.memory.error) {
    const m = plan.memory;
    parts.push(`memory plan: UNet ${m.unet}, UNet batch ${m.unet_batch}, VAE batch ${m.vae_batch}, budget ${bytes(m.budget_gib)} (needs ≥ ${bytes(m.minimum_gib)})`);
  } else if (plan.memory && plan.memory.error) {
    parts.push(`<span class="error">${escapeHtml(plan.memory.error)}</span>`);
  } else if (plan.memory_note) {
    parts.push(escapeHtml(plan.memory_note));
  }
  parts.push(plan.estimate_seconds === null ? "time: measured after the first job like this" : `about <b>${formatSeconds(plan.estimate_seconds)}</b>`);
  if (plan.queue_ahead) parts.push(`${plan.queue_ahead} job(s) ahead in the queue`);
  const notes = plan.notes.length ? `<div class="small">${plan.notes.map(escapeHtml).join("<br>")}</div>` : "";
  $("summary").innerHTML = parts.join(" · ") + notes;
  drawOverlay();
}

function escapeHtml(text) {
  const div = document.createElement("div");
  div.textContent = String(text);
  return div.innerHTML;
}

function formatSeconds(s) {
  if (s === null || s === undefined) return "–";
  if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
  return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
}

function drawOverlay(activeBoxes) {
  const img = $("image");
  const canvas = $("overlay");
  const w = img.clientWidth, h = img.clientHeight;
  canvas.width = w;
  canvas.height = h;
  canvas.style.width = w + "px";
  canvas.style.height = h + "px";
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, w, h);
  const plan = state.plan;
  if (!plan || !w) return;
  const sx = w / plan.output[0], sy = h / plan.output[1];
  const rect = (b) => [b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy];
  const tiles = plan.tiles.length ? plan.tiles : plan.pixel_tiles;
  tiles.forEach((b, i) => {
    ctx.fillStyle = i % 2 ? "rgba(47,111,222,0.10)" : "rgba(47,111,222,0.22)";
    ctx.fillRect(...rect(b));
    ctx.strokeStyle = "rgba(20,60,160,0.9)";
    ctx.lineWidth = 1.5;
    ctx.strokeRect(...rect(b));
  });
  let seams = 0;
  ctx.setLineDash([4, 3]);
  for (const pass of plan.seam_fix) {
    for (const b of pass.regions) {
      ctx.strokeStyle = "rgba(230,120,20,0.95)";
      ctx.strokeRect(...rect(b));
      seams += 1;
    }
  }
  ctx.setLineDash([]);
  for (const b of activeBoxes || []) {
    ctx.strokeStyle = "rgba(220,30,30,1)";
    ctx.lineWidth = 3;
    ctx.strokeRect(...rect(b));
  }
  canvas.dataset.tiles = plan.tiles.length;
  canvas.dataset.pixelTiles = plan.pixel_tiles.length;
  canvas.dataset.seamRegions = seams;
  canvas.dataset.active = (activeBoxes || []).length;
}

// -- the Generate mode: txt2img + hires fix ----------------------------------------------------

function fillSelect(id, values, emptyLabel) {
  const select = $(id);
  select.textContent = "";
  for (const value of values) {
    const option = document.createElement("option");
    option.value = value;
    option.textContent = value === "" ? emptyLabel : value;
    select.append(option);
  }
}

function setGen(name, value) {
  const input = $("g-" + name);
  if (!input) return;
  if (input.type === "checkbox") { input.checked = Boolean(value); return; }
  const text = value === null || value === undefined ? "" : String(value);
  if (input.tagName === "SELECT" && text && ![...input.options].some((o) => o.value === text)) {
    const option = document.createElement("option");  // from a PNG: the server will judge it
    option.value = option.textContent = text;
    input.append(option);
  }
  input.value = text;
}

function buildGenerateForm() {
  const m = state.models;
  fillSelect("g-checkpoint", m.checkpoints.length ? m.checkpoints : [""], "(none offered)");
  fillSelect("g-sampler", m.samplers);
  fillSelect("g-scheduler", m.schedulers);
  fillSelect("g-hr_upscaler", m.hr_upscalers);
  fillSelect("g-hr_checkpoint", ["", ...m.checkpoints], "(same checkpoint)");
  fillSelect("g-hr_sampler", ["", ...m.samplers], "(same)");
  fillSelect("g-hr_scheduler", ["", ...m.schedulers], "(same)");
  for (const [name, value] of Object.entries(m.generate_defaults)) setGen(name, value);
  for (const name of ["tile", "overlap"]) setGen(name, state.fields[name].default);
  setGen("checkpoint", m.default_checkpoint || "");
  $("gen-form").addEventListener("input", scheduleGenPlan);
  $("gen-form").addEventListener("change", scheduleGenPlan);
}

function readGenerate() {
  const settings = {};
  for (const input of $("gen-form").elements) {
    if (!input.name) continue;
    if (input.type === "checkbox") settings[input.name] = input.checked;
    else if (input.value === "") continue;  // not set: the default (native size, the first pass's)
    else settings[input.name] = input.type === "number" ? Number(input.value) : input.value;
  }
  return settings;
}

function applyGenerate(values) {
  for (const [name, value] of Object.entries(values || {})) setGen(name, value);
  scheduleGenPlan();
}

function scheduleGenPlan() {
  clearTimeout(state.genTimer);
  state.genTimer = setTimeout(requestGenPlan, 200);
}

async function requestGenPlan() {
  if (state.mode !== "generate") return;
  const summary = $("summary");
  try {
    const settings = readGenerate();
    delete settings.save_first_pass;
    const plan = await api("/api/generate/plan", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(settings),
    });
    showMessage("");
    const [fw, fh] = plan.first_pass, [ow, oh] = plan.output;
    const parts = [`first pass <b>${fw}×${fh}</b>`, `output <b>${ow}×${oh}</b>`];
    parts.push(`${plan.seeds.length} image(s), seed ${plan.seeds.join(", ")}`);
    parts.push(`<b>${plan.units}</b> progress units each`);
    parts.push(plan.estimate_seconds === null ? "time: measured after the first generate job" : `about <b>${formatSeconds(plan.estimate_seconds)}</b> each`);
    if (plan.queue_ahead) parts.push(`${plan.queue_ahead} job(s) ahead in the queue`);
    const notes = plan.notes.length ? `<div class="small">${plan.notes.map(escapeHtml).join("<br>")}</div>` : "";
    summary.innerHTML = parts.join(" · ") + notes;
    summary.dataset.output = `${ow}x${oh}`;
  } catch (error) {
    summary.dataset.output = "";
    showMessage(error.message);
  }
}

function setMode(mode) {
  state.mode = mode;
  document.body.dataset.mode = mode;
  const generate = mode === "generate";
  $("generate-controls").hidden = !generate;
  $("upscale-controls").hidden = generate;
  $("stage-box").hidden = generate;
  for (const [id, on] of [["mode-upscale", !generate], ["mode-generate", generate]]) {
    $(id).setAttribute("aria-selected", String(on));
    $(id).classList.toggle("quiet", !on);
  }
  $("run").textContent = generate ? "Generate" : "Upscale";
  $("run").disabled = generate ? false : state.files.length === 0;
  showMessage("");
  if (generate) scheduleGenPlan();
  else if (state.plan) showPlan(state.plan);
  else $("summary").textContent = "Choose an image to see its tiles.";
}

async function reuseFromFile(file) {
  if (!file) return;
  const form = new FormData();
  form.append("image", file, file.name);
  try {
    const answer = await api("/api/parameters", { method: "POST", body: form });
    if (!answer.text) { showMessage(`${file.name}: no generation parameters in it`); return; }
    applyGenerate(answer.generate);
    $("gen-form").dataset.reused = file.name;
    if (answer.warning) showMessage(answer.warning);
  } catch (error) {
    showMessage(error.message);
  }
}

async function runGenerate() {
  $("run").disabled = true;
  try {
    const answer = await api("/api/generate", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(readGenerate()),
    });
    showMessage("");
    answer.jobs.forEach((id, i) => addJob(id, null, `seed ${answer.seeds[i]}`));
    select(answer.jobs[0]);
  } catch (error) {
    showMessage(error.message);
  } finally {
    $("run").disabled = false;
  }
}

// -- jobs -------------------------------------------------------------------------------------

async function run() {
  if (state.mode === "generate") return runGenerate();
  if (!state.files.length) return;
  const form = new FormData();
  for (const file of state.files) form.append("image", file, file.name);
  form.append("settings", JSON.stringify(readSettings()));
  $("run").disabled = true;
  try {
    const answer = await api("/api/jobs", { method: "POST", body: form });
    showMessage("");
    answer.jobs.forEach((id, i) => addJob(id, state.files[i]));
    select(answer.jobs[0]);
  } catch (error) {
    showMessage(error.message);
  } finally {
    $("run").disabled = state.files.length === 0;
  }
}

function addJob(id, file, label) {
  const item = document.createElement("li");
  item.className = "job";
  item.dataset.id = id;
  item.innerHTML = `<div class="line"><b class="name"></b><span class="state"></span>
    <span class="stage small"></span><span class="eta small"></span>
    <button type="button" class="cancel quiet">Cancel</button>
    <a class="download" hidden download>Download</a></div>
    <progress max="1" value="0"></progress><div class="error"></div>`;
  item.querySelector(".name").textContent = file ? file.name : (label || id);
  item.dataset.kind = label ? "generate" : "upscale";
  item.querySelector(".cancel").addEventListener("click", (event) => {
    event.stopPropagation();
    api(`/api/jobs/${id}/cancel`, { method: "POST" }).catch((e) => showMessage(e.message));
  });
  item.addEventListener("click", () => select(id));
  $("queue").prepend(item);
  state.jobs.set(id, {
    id, file, item, generated: Boolean(label), status: null, timer: setTimeout(() => poll(id), 100),
  });
}

function select(id) {
  state.selected = id;
  for (const job of state.jobs.values()) job.item.classList.toggle("selected", job.id === id);
  const job = state.jobs.get(id);
  if (job && job.status && job.status.state === "done") showAfter(job);
}

async function poll(id) {
  const job = state.jobs.get(id);
  let status;
  try {
    status = await api(`/api/jobs/${id}`);
  } catch (error) {
    job.timer = setTimeout(() => poll(id), 1000);
    return;
  }
  job.status = status;
  const item = job.item;
  item.querySelector("progress").value = status.fraction;
  item.querySelector(".state").textContent = `${status.state} ${Math.round(status.fraction * 100)} %`;
  item.querySelector(".state").className = `state state-${status.state}`;
  item.dataset.state = status.state;
  item.querySelector(".stage").textContent = status.state === "running" ? status.stage : "";
  item.querySelector(".eta").textContent = status.state === "running" || status.state === "queued" ? `ETA ${formatSeconds(status.eta)}` : (status.seconds ? `${status.seconds} s` : "");
  item.querySelector(".error").textContent = status.error || "";
  const finished = ["done", "failed", "cancelled"].includes(status.state);
  item.querySelector(".cancel").hidden = finished;
  if (id === state.selected) {
    if (!job.generated) drawOverlay(status.state === "running" ? status.tiles : []);
    if (status.has_preview && status.state === "running") {
      $("preview-box").hidden = false;
      $("preview").src = `/api/jobs/${id}/preview?t=${Date.now()}`;
      $("preview-label").textContent = status.preview_kind === "latent approximation"
        ? "live preview: approximate (latent → RGB projection, not the VAE)"
        : "live preview: the canvas as redrawn so far";
    }
  }
  if (status.state === "done") {
    const link = item.querySelector(".download");
    link.href = `/api/jobs/${id}/result`;
    link.download = status.output;
    link.hidden = false;
    if (id === state.selected) showAfter(job);
  }
  if (finished) {
    if (id === state.selected) $("preview-box").hidden = true;
    if (state.mode === "generate") scheduleGenPlan();
    else schedulePlan();
    return;
  }
  job.timer = setTimeout(() => poll(id), 300);
}

function showAfter(job) {
  const s = job.status;
  $("after").hidden = false;
  $("after-name").textContent = `${s.name} → ${s.output} (${s.output_size[0]}×${s.output_size[1]}, ${s.seconds} s)`;
  const after = $("after-img"), before = $("before-img");
  after.onload = fitBefore;
  after.src = `/api/jobs/${job.id}/result`;
  $("compare").classList.toggle("generated", job.generated);
  $("slider").parentElement.hidden = job.generated;
  if (job.generated) before.removeAttribute("src");  // nothing came before a generated image
  else before.src = job.file ? URL.createObjectURL(job.file) : `/api/jobs/${job.id}/source`;
  $("download").href = `/api/jobs/${job.id}/result`;
  $("download").download = s.output;
  $("parameters").textContent = s.parameters || "";
  $("stats").textContent = JSON.stringify(s.stats, null, 2);
}

function fitBefore() {
  const after = $("after-img"), before = $("before-img");
  const zoom = $("compare").classList.contains("zoom");
  before.style.width = (zoom ? after.naturalWidth : after.clientWidth) + "px";
  before.style.height = (zoom ? after.naturalHeight : after.clientHeight) + "px";
  $("before-clip").style.width = $("slider").value + "%";
}

// -- wiring -----------------------------------------------------------------------------------

async function init() {
  try {
    state.models = await api("/api/models");
  } catch (error) {
    showMessage(`cannot reach the server: ${error.message}`);
    return;
  }
  $("version").textContent = "v" + state.models.version;
  $("output-dir").textContent = state.models.output_dir;
  for (const field of state.models.fields) state.fields[field.name] = field;
  buildForm();
  buildGenerateForm();
  $("mode-upscale").addEventListener("click", () => setMode("upscale"));
  $("mode-generate").addEventListener("click", () => setMode("generate"));
  $("gen-reuse-file").addEventListener("change", (e) => reuseFromFile(e.target.files[0]));
  const genBox = $("generate-controls");
  genBox.addEventListener("dragover", (e) => e.preventDefault());
  genBox.addEventListener("drop", (e) => { e.preventDefault(); reuseFromFile(e.dataTransfer.files[0]); });
  for (const name of Object.keys(state.models.presets)) {
    const option = document.createElement("option");
    option.value = option.textContent = name;
    $("preset").append(option);
  }
  $("preset").addEventListener("change", (e) => {
    if (e.target.value) applySettings(state.models.presets[e.target.value]);
  });
  $("files").addEventListener("change", (e) => setFiles(e.target.files));
  $("folder").addEventListener("change", (e) => setFiles(e.target.files));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    setFiles(e.dataTransfer.files);
  });
  $("run").addEventListener("click", run);
  $("reuse-apply").addEventListener("click", () => { applySettings(state.reuse || {}); $("reuse").hidden = true; });
  $("reuse-dismiss").addEventListener("click", () => { $("reuse").hidden = true; });
  $("reuse-generate").addEventListener("click", () => {
    $("reuse").hidden = true;
    setMode("generate");
    applyGenerate(state.reuseGenerate);
  });
  $("slider").addEventListener("input", fitBefore);
  $("zoom").addEventListener("click", () => { $("compare").classList.toggle("zoom"); fitBefore(); });
  window.addEventListener("resize", () => { drawOverlay(); fitBefore(); });
  document.body.dataset.ready = "1";
}

init();
