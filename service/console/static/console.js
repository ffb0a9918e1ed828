// ModelPress console: live regions, the method switch, optional groups and exclusive ranges.
// Plain script, no library; every page works without it (a reload shows the same facts).
"use strict";

function poll(region) {
  var every = parseInt(region.getAttribute("data-live-every") || "2000", 10);
  var url = region.getAttribute("data-live-url");
  function tick() {
    fetch(url, {credentials: "same-origin", headers: {"Accept": "text/html"}}).then(function (response) {
      if (response.status === 401 || response.status === 404) { window.location.reload(); return undefined; }
      return response.ok ? response.text() : null;
    }).then(function (html) {
      if (html === undefined) { return; }  // reloading: the page shows why (sign-in, or the job is gone)
      if (html === null) { window.setTimeout(tick, every * 2); return; }
      if (region.innerHTML.trim() !== html.trim()) { region.innerHTML = html; }
      var finished = region.querySelector("[data-final]");
      if (finished && region.hasAttribute("data-reload-when-final")) { window.location.reload(); return; }
      // A list keeps polling while any of its jobs is unfinished.
      var pending = region.querySelector("[data-state=queued], [data-state=running]");
      if (region.hasAttribute("data-reload-when-final") || pending) { window.setTimeout(tick, every); }
    }).catch(function () { window.setTimeout(tick, every * 2); });
  }
  var pendingNow = region.querySelector("[data-state=queued], [data-state=running]");
  if (region.hasAttribute("data-reload-when-final") || pendingNow) { window.setTimeout(tick, every); }
}

function setEnabled(container, enabled) {
  container.querySelectorAll("input, select, textarea").forEach(function (el) {
    if (!el.hasAttribute("data-group-toggle")) { el.disabled = !enabled; }
  });
}

function methodSwitch(form) {
  var select = form.querySelector("select[name='spec.method']");
  if (!select) { return; }
  function update() {
    form.querySelectorAll("fieldset[data-method]").forEach(function (section) {
      var active = section.getAttribute("data-method") === select.value;
      section.hidden = !active;
      section.disabled = !active;
    });
  }
  select.addEventListener("change", update);
  update();
}

function groupToggles(form) {
  form.querySelectorAll("[data-group-toggle]").forEach(function (toggle) {
    var body = document.getElementById(toggle.getAttribute("data-group-toggle"));
    function update() { setEnabled(body, toggle.checked); body.hidden = !toggle.checked; }
    toggle.addEventListener("change", update);
    update();
  });
}

function exclusiveRanges(form) {
  form.querySelectorAll("[data-min-exclusive], [data-max-exclusive]").forEach(function (input) {
    function check() {
      var value = parseFloat(input.value), message = "";
      var low = input.getAttribute("data-min-exclusive"), high = input.getAttribute("data-max-exclusive");
      if (input.value !== "" && !isNaN(value)) {
        if (low !== null && !(value > parseFloat(low))) { message = "Must be greater than " + low + "."; }
        if (high !== null && !(value < parseFloat(high))) { message = "Must be less than " + high + "."; }
      }
      input.setCustomValidity(message);
    }
    input.addEventListener("input", check);
    check();
  });
}

document.addEventListener("DOMContentLoaded", function () {
  document.querySelectorAll("[data-live-url]").forEach(poll);
  document.querySelectorAll("form.spec-form").forEach(function (form) {
    methodSwitch(form);
    groupToggles(form);
    exclusiveRanges(form);
  });
  var summary = document.getElementById("error-summary");
  if (summary) { summary.focus(); }
});
