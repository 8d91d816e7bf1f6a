//! The `#[grain]` attribute. Use it through the `grains` crate (`grains::grain`), which documents it.
//!
//! The macro is a small pipeline, in the manner of serde_derive: `parse` reads the annotated item into a
//! model, `validate` collects every misuse as a spanned error that says what to write instead, and
//! `expand` emits code that names everything through `::grains::__private`. On invalid input the item is
//! emitted unchanged beside the errors, so the user sees our message and not a cascade of follow-on errors.

use proc_macro::TokenStream;
use proc_macro2::TokenStream as TokenStream2;
use quote::ToTokens;

mod expand;
mod parse;
mod validate;

/// The duration parser of `grains::duration`, shared as source (a proc-macro crate cannot depend on `grains`).
#[allow(unreachable_pub, dead_code)]
mod duration {
    use std::time::Duration;

    include!("../../grains/src/duration_text.rs");
}

/// Turns a struct into a virtual grain type, or an impl block into its callable methods.
///
/// See the `grains` crate documentation for the full story and an example.
///
/// On the struct: `#[grain]`, `#[grain(name = "shop.Cart")]` (the type name on the wire and in storage;
/// default: the struct name), `#[grain(idle_timeout = "10m")]` (idle time before passivation; default: the
/// silo's, 15 minutes). Fields of type `PersistentState<T>` are loaded on activation (state name: the field
/// name, or `#[state(name = "...")]`), fields of type `Journaled<S>` are recovered from the grain's event journal
/// (`#[journal(name = "...", snapshot_every = N)]`, both optional: the field name, no snapshots),
/// `GrainContext` fields receive the context, other fields are defaulted.
///
/// On the impl block: every `pub` (or `pub(crate)`, ...) `async fn` taking `&self` or `&mut self` becomes a
/// grain method, and
/// `on_activate` / `on_deactivate` (`async fn(&mut self, &GrainContext) -> Result<(), GrainError>`) are
/// lifecycle hooks; `on_reminder` (`async fn(&mut self, ReminderTick) -> Result<(), GrainError>`) receives the
/// grain's reminder ticks. The macro generates `XRequest` and `XResponse` enums and the typed reference `XRef`.
///
/// HTTP: `#[grain(http)]` on the impl block serves every grain method of the type over the silo's HTTP/JSON API
/// (`POST /grains/{type}/{key}/{method}`), except those marked `#[http(skip)]`; without it, `#[http]` on a
/// method serves that method alone. Nothing is served over HTTP otherwise.
#[proc_macro_attribute]
pub fn grain(args: TokenStream, input: TokenStream) -> TokenStream {
    expand_grain(args.into(), input.into()).into()
}

fn expand_grain(args: TokenStream2, input: TokenStream2) -> TokenStream2 {
    let item: syn::Item = match syn::parse2(input.clone()) {
        Ok(item) => item,
        Err(e) => return e.to_compile_error(),
    };
    let result = match item {
        syn::Item::Struct(item) => match parse::GrainStruct::parse(args, item) {
            Ok(model) => match validate::grain_struct(&model) {
                Ok(()) => Ok(expand::grain_struct(&model)),
                // Bad option values (a duration, a placement, a name) still leave a well-formed grain type:
                // expand it with defaults beside the errors, so its impl block reports nothing more.
                Err(errors) if validate::expandable(&model) => {
                    let mut out = errors.to_compile_error();
                    out.extend(expand::grain_struct(&model));
                    return out;
                }
                Err(errors) => Err(errors),
            },
            Err(errors) => Err(errors),
        },
        syn::Item::Impl(item) => parse::GrainImpl::parse(args, item)
            .and_then(|model| validate::grain_impl(&model).map(|()| model))
            .map(|model| expand::grain_impl(&model)),
        other => Err(syn::Error::new_spanned(
            other,
            "#[grain] goes on a struct (the grain's state) and on its `impl` block (the grain's methods)",
        )),
    };
    match result {
        Ok(tokens) => tokens,
        Err(errors) => {
            // Emit the item untouched beside the errors, with `#[state]` helpers removed, so that only
            // our message is reported.
            let mut out = errors.to_compile_error();
            match syn::parse2::<syn::Item>(input) {
                Ok(syn::Item::Struct(mut s)) => {
                    parse::strip_state_attrs(&mut s);
                    s.to_tokens(&mut out);
                }
                Ok(syn::Item::Impl(mut i)) => {
                    parse::strip_http_attrs(&mut i);
                    // Keep the first of duplicated methods, so rustc does not report them again.
                    let mut seen = std::collections::HashSet::new();
                    i.items.retain(|item| match item {
                        syn::ImplItem::Fn(f) => seen.insert(f.sig.ident.to_string()),
                        _ => true,
                    });
                    i.to_tokens(&mut out);
                }
                Ok(item) => item.to_tokens(&mut out),
                Err(_) => {}
            }
            out
        }
    }
}
