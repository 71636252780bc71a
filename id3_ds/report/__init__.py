"""Human-facing views of a run: pictures of its log and of where its budget went (`id3-ds plot`)."""
