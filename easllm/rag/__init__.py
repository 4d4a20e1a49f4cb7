"""Knowledge base (RAG): loaders, splitter, embedder, vector store, retriever."""
