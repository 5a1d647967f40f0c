//! LogSage (002_28bdf65b24f1a9d8.txt) without an LLM.
