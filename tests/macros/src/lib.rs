//! `#[test]` for bootsync's one integration-test binary (`tests/it`): registers a test with
//! the binary's harness, which runs it, and reports it as ignored, never as passed, when a
//! program it needs (etcd, Chromium) is missing.
//!
//! ```ignore
//! #[it::test]                          // sync, or async on a current-thread runtime
//! #[it::test(multi_thread)]            // async on a two-worker runtime
//! #[it::test(needs = etcd)]            // ignored (and counted) without `etcd` on PATH
//! ```

use proc_macro::TokenStream;
use quote::quote;
use syn::parse::Parser;
use syn::punctuated::Punctuated;
use syn::{Ident, ItemFn, Meta, Token};

/// Registers the function as a test of the integration-test binary.
#[proc_macro_attribute]
pub fn test(attr: TokenStream, item: TokenStream) -> TokenStream {
    match expand(attr.into(), item.into()) {
        Ok(tokens) => tokens.into(),
        Err(err) => err.to_compile_error().into(),
    }
}

fn expand(
    attr: proc_macro2::TokenStream,
    item: proc_macro2::TokenStream,
) -> syn::Result<proc_macro2::TokenStream> {
    let function: ItemFn = syn::parse2(item)?;
    let mut multi_thread = false;
    let mut needs: Vec<Ident> = Vec::new();
    let options = Punctuated::<Meta, Token![,]>::parse_terminated.parse2(attr)?;
    for option in options {
        match &option {
            Meta::Path(path) if path.is_ident("multi_thread") => multi_thread = true,
            Meta::NameValue(pair) if pair.path.is_ident("needs") => match &pair.value {
                syn::Expr::Path(what) if what.path.get_ident().is_some() => {
                    needs.push(what.path.get_ident().cloned().expect("checked"));
                }
                other => {
                    return Err(syn::Error::new_spanned(
                        other,
                        "needs = etcd or needs = browser",
                    ));
                }
            },
            other => {
                return Err(syn::Error::new_spanned(
                    other,
                    "expected multi_thread or needs = NAME",
                ));
            }
        }
    }
    let name = &function.sig.ident;
    let is_async = function.sig.asyncness.is_some();
    if !is_async && multi_thread {
        return Err(syn::Error::new_spanned(
            &function.sig,
            "multi_thread applies to async tests only",
        ));
    }
    let run = if is_async {
        let flavor = if multi_thread {
            quote!(crate::harness::Flavor::MultiThread)
        } else {
            quote!(crate::harness::Flavor::CurrentThread)
        };
        quote!(crate::harness::block_on(#flavor, #name()))
    } else {
        quote!(#name())
    };
    let needs = needs.iter().map(|need| {
        let variant = Ident::new(&capitalise(&need.to_string()), need.span());
        quote!(crate::harness::Need::#variant)
    });
    Ok(quote! {
        #function

        ::inventory::submit! {
            crate::harness::Test {
                path: ::core::module_path!(),
                name: ::core::stringify!(#name),
                needs: &[#(#needs),*],
                run: || #run,
            }
        }
    })
}

fn capitalise(word: &str) -> String {
    let mut chars = word.chars();
    chars
        .next()
        .map(|first| first.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}
