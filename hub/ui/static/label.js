// Labelling by keyboard: digit N presses the N-th class button of the first item on the page.
document.addEventListener("keydown", (event) => {
  if (event.target instanceof HTMLInputElement || event.ctrlKey || event.metaKey || event.altKey) return;
  if (!/^[0-9]$/.test(event.key)) return;
  const button = document.querySelector(`.label-form button[data-key="${event.key}"]`);
  if (button) {
    event.preventDefault();
    button.click();
  }
});
