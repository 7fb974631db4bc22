// Herald console: a little behaviour on top of server-rendered pages. No library, nothing inline.
"use strict";

// A form with data-confirm asks before it is sent (cancel, reject, remove, retry all).
document.addEventListener("submit", function (event) {
  var form = event.target;
  var question = form.getAttribute && form.getAttribute("data-confirm");
  if (question && !window.confirm(question)) {
    event.preventDefault();
  }
});

// The raw v2: clicking a field names it under the message and marks its row in the field table.
document.addEventListener("DOMContentLoaded", function () {
  var raw = document.getElementById("raw-v2");
  if (!raw) {
    return;
  }
  var status = document.createElement("p");
  status.id = "field-name";
  raw.parentNode.insertBefore(status, raw.nextSibling);
  raw.addEventListener("click", function (event) {
    var span = event.target.closest ? event.target.closest(".f") : null;
    if (!span) {
      return;
    }
    raw.querySelectorAll(".f.hit").forEach(function (el) { el.classList.remove("hit"); });
    document.querySelectorAll("table.fields tr.hit").forEach(function (el) { el.classList.remove("hit"); });
    span.classList.add("hit");
    status.textContent = span.getAttribute("title");
    var name = span.getAttribute("data-field");
    var rows = document.querySelectorAll("table.fields tbody tr");
    for (var i = 0; i < rows.length; i++) {
      if (rows[i].firstElementChild && rows[i].firstElementChild.textContent === name) {
        rows[i].classList.add("hit");
        rows[i].scrollIntoView({ block: "nearest" });
        break;
      }
    }
  });
});
