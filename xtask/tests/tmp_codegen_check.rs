#[path = "../src/codegen.rs"]
mod codegen;
