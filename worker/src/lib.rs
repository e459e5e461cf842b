pub mod export;
pub mod tokenizer;
