// Ask before a form that says so (cancel, bulk retry) is sent. A file, not inline: the CSP allows
// scripts from this function only.
document.addEventListener("submit", (event) => {
  const question = event.target.dataset.confirm;
  if (question && !window.confirm(question)) event.preventDefault();
});
