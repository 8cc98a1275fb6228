"""Stage 6, publishing: scored and selected data, the proxy ensemble and target adapters as Hub
repos with cards (`hub`), and the ``push`` verb's inputs (`push`)."""
